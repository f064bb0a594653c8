"""Download: a verified, atomic fetch of the archive, served here over loopback."""

from __future__ import annotations

import io
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ncf.config import Config, DataConfig
from ncf.data import DataError, download_dataset, resolve_data_dir, sha256_normalised
from ncf.integrations.ray_train import free_port

README = b"A synthetic MovieLens-format dataset for the tests.\n"


class ArchiveServer:
    """Serves byte strings at paths; can announce a Content-Length longer than the body."""

    def __init__(self) -> None:
        self.bodies: dict[str, tuple[bytes, int | None]] = {}
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                with server.lock:
                    server.hits[self.path] = server.hits.get(self.path, 0) + 1
                if self.path not in server.bodies:
                    self.send_error(404)
                    return
                body, announced = server.bodies[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(announced if announced is not None else len(body)))
                self.end_headers()
                self.wfile.write(body)  # then the connection closes (HTTP/1.0)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def serve(self, name: str, body: bytes, content_length: int | None = None) -> str:
        self.bodies[f"/{name}"] = (body, content_length)
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def hit_count(self, name: str) -> int:
        return self.hits.get(f"/{name}", 0)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server():
    srv = ArchiveServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def real_files(tiny_dir: Path) -> dict[str, bytes]:
    """The files of an archive: the tiny dataset's CSVs (checksummed) and a README (not)."""
    files = {name: (tiny_dir / name).read_bytes() for name in ("movies.csv", "ratings.csv")}
    assert b"\r\n" not in files["ratings.csv"]  # the originals use LF
    return files | {"README.txt": README}


def make_zip(files: dict[str, bytes]) -> bytes:
    """An archive laid out as GroupLens ships it: everything inside ml-latest-small/."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("ml-latest-small/", b"")
        for name, content in files.items():
            zf.writestr(f"ml-latest-small/{name}", content)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good_zip(real_files: dict[str, bytes]) -> bytes:
    return make_zip(real_files)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def data_config(config: Config, url: str, cache_dir: Path) -> DataConfig:
    return config.data.model_copy(update={"url": url, "cache_dir": str(cache_dir)})


def assert_nothing_left(cache_dir: Path) -> None:
    leftovers = sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []
    assert leftovers == [], f"the failed download left {leftovers} in {cache_dir}"


def test_good_archive_is_extracted_and_verified(server, good_zip, tiny_config, cache_dir, real_files):
    cfg = data_config(tiny_config, server.serve("ml.zip", good_zip), cache_dir)
    folder = download_dataset(cfg)
    assert folder == cache_dir / "ml-latest-small"
    for name, digest in cfg.sha256.items():
        assert sha256_normalised(folder / name) == digest
        assert (folder / name).read_bytes() == real_files[name]
    assert sorted(p.name for p in cache_dir.iterdir()) == ["ml-latest-small"]  # no temp folder left
    assert server.hit_count("ml.zip") == 1


def test_crlf_archive_verifies_and_is_written_with_lf(server, real_files, tiny_config, cache_dir):
    crlf = {name: content.replace(b"\n", b"\r\n") for name, content in real_files.items()}
    cfg = data_config(tiny_config, server.serve("crlf.zip", make_zip(crlf)), cache_dir)
    folder = download_dataset(cfg)
    for name, digest in cfg.sha256.items():
        content = (folder / name).read_bytes()
        assert b"\r\n" not in content
        assert content == real_files[name]
        assert sha256_normalised(folder / name) == digest


def test_corrupt_archive_is_refused_and_leaves_nothing(server, real_files, tiny_config, cache_dir):
    ratings = bytearray(real_files["ratings.csv"])
    at = ratings.index(b"\n1,14,3.5,") + len(b"\n1,14,")
    ratings[at] = ord("4")
    archive = make_zip({**real_files, "ratings.csv": bytes(ratings)})
    cfg = data_config(tiny_config, server.serve("corrupt.zip", archive), cache_dir)
    with pytest.raises(DataError, match="ratings.csv is corrupt"):
        download_dataset(cfg)
    assert not (cache_dir / "ml-latest-small").exists()
    assert_nothing_left(cache_dir)


def test_archive_missing_a_file_is_refused(server, real_files, tiny_config, cache_dir):
    archive = make_zip({name: content for name, content in real_files.items() if name != "movies.csv"})
    cfg = data_config(tiny_config, server.serve("partial.zip", archive), cache_dir)
    with pytest.raises(DataError, match="movies.csv is missing"):
        download_dataset(cfg)
    assert_nothing_left(cache_dir)


def test_truncated_archive_is_refused_and_leaves_nothing(server, good_zip, tiny_config, cache_dir):
    cfg = data_config(tiny_config, server.serve("half.zip", good_zip[: len(good_zip) // 2]), cache_dir)
    with pytest.raises(DataError, match="corrupt"):
        download_dataset(cfg)
    assert_nothing_left(cache_dir)


def test_body_shorter_than_content_length_is_refused(server, good_zip, tiny_config, cache_dir):
    half = good_zip[: len(good_zip) // 2]
    cfg = data_config(tiny_config, server.serve("short.zip", half, content_length=len(good_zip)), cache_dir)
    with pytest.raises(DataError, match=f"truncated: {len(half)} of {len(good_zip)} bytes"):
        download_dataset(cfg)
    assert_nothing_left(cache_dir)


@pytest.mark.parametrize("where", ["missing.zip", "closed port"])
def test_unreachable_archive_is_a_clear_error_and_leaves_nothing(server, tiny_config, cache_dir, where):
    url = server.serve("ml.zip", b"").replace("ml.zip", "missing.zip")  # the server answers 404
    if where == "closed port":
        url = f"http://127.0.0.1:{free_port()}/ml.zip"
    with pytest.raises(DataError, match=f"could not download {re.escape(url)} .*NCF_DATA_DIR"):
        download_dataset(data_config(tiny_config, url, cache_dir))
    assert_nothing_left(cache_dir)


def test_verified_cache_is_not_downloaded_again(server, good_zip, tiny_config, cache_dir):
    cfg = data_config(tiny_config, server.serve("ml.zip", good_zip), cache_dir)
    first = download_dataset(cfg)
    assert server.hit_count("ml.zip") == 1
    assert download_dataset(cfg) == first
    assert server.hit_count("ml.zip") == 1


def test_corrupted_cache_is_refused(server, good_zip, tiny_config, cache_dir):
    cfg = data_config(tiny_config, server.serve("ml.zip", good_zip), cache_dir)
    folder = download_dataset(cfg)
    with open(folder / "movies.csv", "ab") as f:
        f.write(b"999999,Extra (2020),Drama\n")
    with pytest.raises(DataError, match="movies.csv is corrupt"):
        download_dataset(cfg)


def test_resolve_data_dir_prefers_ncf_data_dir(monkeypatch, tmp_path, config):
    monkeypatch.setenv("NCF_DATA_DIR", str(tmp_path))
    cfg = config.data.model_copy(update={"dir": str(tmp_path / "elsewhere"), "url": "http://127.0.0.1:9/none.zip"})
    assert resolve_data_dir(cfg) == tmp_path.resolve()


def test_resolve_data_dir_errors_on_missing_folder(monkeypatch, tmp_path, config):
    monkeypatch.setenv("NCF_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(config.data)


def test_resolve_data_dir_uses_configured_dir(monkeypatch, tmp_path, config):
    monkeypatch.delenv("NCF_DATA_DIR", raising=False)
    assert resolve_data_dir(config.data.model_copy(update={"dir": str(tmp_path)})) == tmp_path.resolve()
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(config.data.model_copy(update={"dir": str(tmp_path / "nope")}))


def test_resolve_data_dir_downloads_when_nothing_configured(monkeypatch, server, good_zip, tiny_config, cache_dir):
    monkeypatch.delenv("NCF_DATA_DIR", raising=False)
    cfg = data_config(tiny_config, server.serve("ml.zip", good_zip), cache_dir).model_copy(update={"dir": None})
    assert resolve_data_dir(cfg) == cache_dir / "ml-latest-small"
    assert server.hit_count("ml.zip") == 1
