"""The HTTP API under hostile input, over real HTTP: schemathesis fuzzes every operation of the app's own OpenAPI
schema (valid and invalid parameters and bodies, every check), and bodies over the size and pair limits are refused
with a JSON error before they are parsed. One app for the module (the `served_url` fixture)."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from ncf.config import load_config
from serving.schemas import MAX_ID, MAX_PAIRS

pytestmark = pytest.mark.integration

SCHEMATHESIS = Path(sys.executable).with_name("st")  # its CLI, installed with the dev extra
# Cases per operation and generation mode in the fuzzing phase; the examples and coverage phases add their own.
MAX_EXAMPLES = 200
MIN_REQUESTS = 1000
TIME_LIMIT_S = 300  # the whole run on the 2-core machine (about a minute when quiet)


TOKEN = f"fuzz-{secrets.token_hex(16)}"  # the app's NCF_API_TOKEN: the writes' bearer token


@pytest.fixture(scope="module", autouse=True)
def _writes_need_a_token() -> Iterator[None]:
    """The module's app starts with NCF_API_TOKEN set (its replicas take it from the environment Ray starts in), so
    the fuzzer checks that writes without the token are refused as the schema says, and writes with it accepted."""
    previous = os.environ.get("NCF_API_TOKEN")
    os.environ["NCF_API_TOKEN"] = TOKEN
    yield
    if previous is None:
        os.environ.pop("NCF_API_TOKEN")
    else:
        os.environ["NCF_API_TOKEN"] = previous


def fuzz(base_url: str, report: Path) -> subprocess.CompletedProcess:
    """`st run` against the schema the app publishes: the examples, coverage and fuzzing phases (stateful needs
    links the schema has none of), valid and invalid data, every check (those of authentication included: requests
    carry the bearer token, and the fuzzer also sends them without it); a fixed seed, so each run sends the same
    requests; every request and response recorded in `report` (HAR)."""
    return subprocess.run(
        [str(SCHEMATHESIS), "run", f"{base_url}/openapi.json", "--phases", "examples,coverage,fuzzing",
         "--checks", "all", "--mode", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", "13",
         "--generation-database", "none", "--workers", "1", "--request-timeout", "60", "--no-color",
         "--header", f"Authorization: Bearer {TOKEN}", "--report", "har", "--report-har-path", str(report)],
        cwd=report.parent, capture_output=True, text=True, timeout=TIME_LIMIT_S)  # cwd: no stray schemathesis.toml


def operation(method: str, path: str) -> str:
    """The schema's operation a request went to ("GET /users/{user_id}/history")."""
    return f"{method} {re.sub(r'^/users/[^/]+/history$', '/users/{user_id}/history', path)}"


def test_fuzzing_finds_no_server_error_and_no_answer_outside_the_schema(served_url: str, tmp_path: Path):
    """Over 1,000 generated requests across every operation, in bounded time: no 5xx, and every response has a
    documented status code, content type, headers and body; invalid input is refused with a 4xx and valid input
    accepted (an unknown id may be a 404); a method an operation does not have is a 405 naming the ones it has."""
    report = tmp_path / "fuzz.har"
    started = time.perf_counter()
    done = fuzz(served_url, report)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, f"{done.stdout[-8000:]}\n{done.stderr[-2000:]}"

    entries = json.loads(report.read_text())["log"]["entries"]
    sent = Counter(operation(e["request"]["method"], urlsplit(e["request"]["url"]).path) for e in entries)
    statuses = Counter(e["response"]["status"] for e in entries)
    print(f"\nschemathesis: {len(entries)} requests in {seconds:.0f} s; per operation {dict(sorted(sent.items()))}; "
          f"statuses {dict(sorted(statuses.items()))}")
    paths = httpx.get(f"{served_url}/openapi.json").json()["paths"]
    documented = {f"{method.upper()} {path}" for path, methods in paths.items() for method in methods}
    assert documented <= set(sent), f"operations never requested: {documented - set(sent)}"
    assert len(entries) >= MIN_REQUESTS
    assert not [status for status in statuses if status >= 500]
    assert seconds < TIME_LIMIT_S
    # schemathesis checked every response; the gist again from its record: a status code the operation documents
    # (or 405 for a method it does not have), and a JSON `{"error": ...}` for every error.
    for entry in entries:
        method, path = operation(entry["request"]["method"], urlsplit(entry["request"]["url"]).path).split(" ", 1)
        status, content = entry["response"]["status"], entry["response"]["content"]
        responses = paths.get(path, {}).get(method.lower(), {}).get("responses", {"405": {}})
        assert str(status) in responses, (method, path, status, content.get("text", "")[:200])
        assert content["mimeType"] == "application/json", (method, path, status)
        if status >= 400:
            assert set(json.loads(content["text"])) == {"error"}, (method, path, status, content["text"][:200])


# ----------------------------------------------------------------------------- bounded bodies


LIMIT = load_config().serve.max_body_bytes  # served_url runs with the default


def pairs_body(n: int, user_id: int = MAX_ID, movie_id: int = MAX_ID) -> bytes:
    return json.dumps({"pairs": [{"user_id": user_id, "movie_id": movie_id}] * n}).encode()


def assert_json_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


def test_the_error_statuses_are_documented_for_every_operation(http: httpx.Client):
    paths = http.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            for status in ("413", "422"):
                documented = operation["responses"][status]["content"]["application/json"]["schema"]
                assert documented == {"$ref": "#/components/schemas/ErrorOut"}, (method, path, status)


def test_body_over_the_limit_is_refused_with_413_before_it_is_read(served_url: str, http: httpx.Client):
    too_long = pairs_body(3 * MAX_PAIRS)
    assert len(too_long) > LIMIT
    error = assert_json_error(http.post("/predict", content=too_long,
                                        headers={"content-type": "application/json"}), 413)
    assert f"{LIMIT} bytes" in error and "max_body_bytes" in error

    # Refused on its Content-Length alone: the answer comes although not one byte of the body is sent.
    url = urlsplit(served_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as raw:
        raw.sendall(f"POST /predict HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {100 * LIMIT}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"max_body_bytes" in body


def test_chunked_body_over_the_limit_is_refused_with_413(http: httpx.Client):
    """No Content-Length: the body is counted as it arrives, and refused once past the limit."""
    def chunks():
        yield b'{"pairs": ['
        pairs = b'{"user_id": 1, "movie_id": 1}, ' * 2000
        for _ in range(4 * LIMIT // len(pairs)):
            yield pairs

    response = http.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "max_body_bytes" in assert_json_error(response, 413)


def test_too_many_pairs_within_the_byte_limit_is_a_422(http: httpx.Client):
    body = pairs_body(MAX_PAIRS + 1)
    assert len(body) <= LIMIT  # the pair limit, not the byte limit, refuses it
    error = assert_json_error(http.post("/predict", content=body, headers={"content-type": "application/json"}), 422)
    assert "pairs" in error and str(MAX_PAIRS) in error


def test_a_body_at_the_pair_limit_is_accepted(http: httpx.Client, model_store):
    known = model_store.recommender(model_store.champion).ids
    body = pairs_body(MAX_PAIRS, int(known.user_ids[0]), int(known.movie_ids[0]))
    response = http.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text[:500]
    assert len(response.json()["predictions"]) == MAX_PAIRS


@pytest.mark.parametrize("body", [b"\xff\xfe{not utf-8}", b'{"pairs": [' * 50_000, b"{", b"", b"null"],
                         ids=["not-utf8", "nested-too-deep", "truncated", "empty", "null"])
def test_undecodable_body_is_a_422_json_error(http: httpx.Client, body: bytes):
    assert_json_error(http.post("/predict", content=body, headers={"content-type": "application/json"}), 422)


def test_the_service_listens_on_loopback_only(served_url: str):
    port = urlsplit(served_url).port
    listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}
