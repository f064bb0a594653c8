"""Two `make serve` processes (each its own Ray instance and replica) sharing one ratings store, as replicas on
different machines would: a rating acknowledged by one changes the other's next answer; a restarted `make serve`
keeps every acknowledged rating; `serve.live_updates=false` answers as if there were none, while still storing
them; a server with NCF_API_TOKEN set takes writes with that bearer token only."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import httpx
import pytest
from services import serve_process

from ncf.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(model_store, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    store = tmp_path_factory.mktemp("shared-store") / "ratings.db"
    return os.environ | {"MLFLOW_TRACKING_URI": model_store.uri, "NCF_FEEDBACK_URI": f"sqlite:///{store}"}


TOKEN = f"token-{uuid.uuid4().hex}"
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def b_url(env: dict[str, str]) -> Iterator[str]:
    """Server B: writes need the token."""
    port = free_port()
    with serve_process(port, env | {"NCF_API_TOKEN": TOKEN}, "serve.warm_users=0"):
        yield f"http://127.0.0.1:{port}"


def rate(url: str, user_id: int, movie_id: int, rating: float = 4.0) -> None:
    body = {"ratings": [{"event_id": str(uuid.uuid4()), "user_id": user_id, "movie_id": movie_id, "rating": rating}]}
    answer = httpx.post(f"{url}/ratings", json=body, headers=AUTHORIZED, timeout=60)
    assert answer.json()["results"][0]["status"] == "stored"


def test_with_a_token_set_writes_need_it_and_reads_do_not(b_url: str):
    body = {"ratings": [{"event_id": str(uuid.uuid4()), "user_id": 1, "movie_id": 1, "rating": 4.0}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for path, json in (("/ratings", body), ("/users", None)):
            answer = httpx.post(f"{b_url}{path}", json=json, headers=headers, timeout=60)
            assert answer.status_code == 401 and "NCF_API_TOKEN" in answer.json()["error"], answer.text
            assert answer.headers["www-authenticate"] == "Bearer"
    assert not [r for r in httpx.get(f"{b_url}/users/1/history", timeout=60).json()["ratings"]
                if r["source"] == "live" and r["movie_id"] == 1]
    assert httpx.post(f"{b_url}/users", headers=AUTHORIZED, timeout=60).status_code == 200


def shown(url: str, user_id: int) -> list[int]:
    answer = httpx.get(f"{url}/recommend", params={"user_id": user_id, "k": 10}, timeout=60).json()
    return [item["movie_id"] for item in answer["items"]]


def test_a_rating_on_one_server_changes_the_others_next_answer_and_survives_a_restart(
        env: dict[str, str], b_url: str, model_store):
    champion = model_store.recommender(model_store.champion)
    port = free_port()
    a_url = f"http://127.0.0.1:{port}"
    with serve_process(port, env, "serve.warm_users=0"):
        for user_id, first, second in ((11, a_url, b_url), (12, b_url, a_url)):
            top = shown(second, user_id)[0]  # cached on the second server before the rating
            rate(first, user_id, top)
            assert top not in shown(second, user_id), f"{second} answered from before the rating"
            assert top not in shown(first, user_id)
        user = httpx.post(f"{a_url}/users", timeout=60).json()["user_id"]  # A: loopback, no token: open
        rate(b_url, user, int(champion.ids.movie_ids[champion.popular(1)[0]]), 5.0)
        assert not httpx.get(f"{a_url}/recommend", params={"user_id": user}, timeout=60).json()["cold_start"]
    # A stopped: B still answers from the shared store; A again, frozen: the dataset's answer, ratings still stored.
    assert top not in shown(b_url, 12)
    with serve_process(port, env, "serve.warm_users=0", "serve.live_updates=false"):
        for user_id in (11, 12):
            assert shown(a_url, user_id) == champion.recommend([user_id], 10)["movie_id"].tolist()
            live = [r for r in httpx.get(f"{a_url}/users/{user_id}/history", timeout=60).json()["ratings"]
                    if r["source"] == "live"]
            assert len(live) == 1
        assert httpx.get(f"{a_url}/recommend", params={"user_id": user}, timeout=60).json()["cold_start"]
        frozen = shown(a_url, 13)
        rate(a_url, 13, frozen[0])  # stored by the frozen server, which keeps its answer; used by the live one
        assert shown(a_url, 13) == frozen
    assert frozen[0] not in shown(b_url, 13)
    assert httpx.get(f"{b_url}/users/13/history", timeout=60).json()["ratings"][0]["source"] == "live"
