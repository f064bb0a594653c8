"""Download: a verified, atomic fetch of the archive, served here over loopback."""

from __future__ import annotations

import io
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ncf.config import Config, DataConfig, with_values
from ncf.data import DataError, download_dataset, resolve_data_dir, sha256_normalised
from ncf.ports import free_port

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
    return with_values(config, {"data.datasets.ml-latest-small.url": url, "data.cache_dir": str(cache_dir)}).data


def assert_nothing_left(cache_dir: Path) -> None:
    leftovers = sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []
    assert leftovers == [], f"the failed download left {leftovers} in {cache_dir}"


def test_good_archive_is_extracted_and_verified(server, good_zip, tiny_config, cache_dir, real_files):
    cfg = data_config(tiny_config, server.serve("ml.zip", good_zip), cache_dir)
    folder = download_dataset(cfg)
    assert folder == cache_dir / "ml-latest-small"
    for name, digest in cfg.published.sha256.items():
        assert sha256_normalised(folder / name) == digest
        assert (folder / name).read_bytes() == real_files[name]
    assert sorted(p.name for p in cache_dir.iterdir()) == ["ml-latest-small"]  # no temp folder left
    assert server.hit_count("ml.zip") == 1


def test_crlf_archive_verifies_and_is_written_with_lf(server, real_files, tiny_config, cache_dir):
    crlf = {name: content.replace(b"\n", b"\r\n") for name, content in real_files.items()}
    cfg = data_config(tiny_config, server.serve("crlf.zip", make_zip(crlf)), cache_dir)
    folder = download_dataset(cfg)
    for name, digest in cfg.published.sha256.items():
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
    cfg = with_values(config, {"data.dir": str(tmp_path / "elsewhere"),
                               "data.datasets.ml-latest-small.url": "http://127.0.0.1:9/none.zip"}).data
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


# ----------------------------------------------------------------------------- other datasets by name

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "movielens"


def fixture_zip(name: str, extra: dict[str, bytes] | None = None) -> bytes:
    """A fixture folder zipped as GroupLens ships it (everything inside one folder), CRLF line endings."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted((FIXTURES / name).iterdir()):
            zf.writestr(f"{name}/{path.name}", path.read_bytes().replace(b"\n", b"\r\n"))
        for member, content in (extra or {}).items():
            zf.writestr(f"{name}/{member}", content)
    return buffer.getvalue()


def named_config(config: Config, name: str, url: str, cache_dir: Path, **published) -> DataConfig:
    values = {"data.name": name, "data.cache_dir": str(cache_dir), f"data.datasets.{name}.url": url}
    return with_values(config, values | {f"data.datasets.{name}.{k}": v for k, v in published.items()}).data


def test_dataset_without_digests_is_checked_against_the_published_sizes(server, config, cache_dir):
    """ml-1m has no known digests: every line is parsed and the sizes compared; the fixture is not the
    published dataset, so it is refused and nothing is kept."""
    cfg = named_config(config, "ml-1m", server.serve("ml-1m.zip", fixture_zip("ml-1m")), cache_dir)
    with pytest.raises(DataError, match=r"ratings\.dat: 20 ratings, but the published ml-1m has 1,000,209"):
        download_dataset(cfg)
    assert_nothing_left(cache_dir)


def test_dataset_without_digests_or_sizes_is_checked_line_by_line(server, config, cache_dir, capfd):
    cfg = named_config(config, "ml-1m", server.serve("ml-1m.zip", fixture_zip("ml-1m")), cache_dir, sizes=None)
    folder = download_dataset(cfg)
    assert folder == cache_dir / "ml-1m"
    assert sorted(p.name for p in folder.iterdir()) == ["movies.dat", "ratings.dat"]
    assert b"\r\n" not in (folder / "ratings.dat").read_bytes()
    assert "ml-1m: no SHA-256 and no published sizes known for ratings.dat, movies.dat" in capfd.readouterr().err


def test_ml_100k_archive_keeps_what_the_reader_needs(server, config, cache_dir):
    archive = fixture_zip("ml-100k", extra={"u.user": b"1|24|M|technician|85711\n", "README": b"read me\n"})
    expected = {name: sha256_normalised(FIXTURES / "ml-100k" / name) for name in ("u.data", "u.item")}
    cfg = named_config(config, "ml-100k", server.serve("ml-100k.zip", archive), cache_dir, sha256=expected)
    folder = download_dataset(cfg)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README", "u.data", "u.genre", "u.item"] + [f"{f}.{part}" for f in ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
                                                    for part in ("base", "test")])


def test_configured_folder_may_hold_a_folder_per_dataset(monkeypatch, tmp_path, config):
    (tmp_path / "ml-100k").mkdir()
    monkeypatch.setenv("NCF_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(with_values(config, {"data.name": "ml-100k"}).data) == (tmp_path / "ml-100k").resolve()
    assert resolve_data_dir(config.data) == tmp_path.resolve()  # no ml-latest-small folder: the folder itself
