"""Prepared data: a dataset parsed, validated, encoded and split once, kept as typed Parquet.

`prepare` makes one pass over the source files (`ncf.movielens_files`' typed readers, `ncf.data`'s encoding and
splits) and writes, in `<data.prepared_dir>/<data.name>` (default `<data.cache_dir>/prepared/<name>`):

    train.parquet, validation.parquet, test.parquet   user int32, movie int32 (indices), rating float32,
                                                      timestamp int64
    users.parquet                                     userId int32: row i is user index i
    movies.parquet                                    movieId int32, title, genres: row i is movie index i
    stats.json                                        dataset statistics
    manifest.json                                     what it was made from: the source files (SHA-256, size,
                                                      times) and the data config that shaped it

A copy with live ratings (`make retrain`, `ncf.live_training`) has the same layout and a `live` section in its
manifest; it is reused while valid like any other, but never rebuilt: an invalid one is a DataError.

It is reused while nothing changed, and rebuilt when the data config that shaped it (dataset, split,
expected checksums and sizes) changes or a source file does: each file's size and times are compared with
the manifest's, and a file whose stat changed is hashed again (same digest: still valid). It is written
in a temporary folder and renamed into place, so no reader ever sees a half-written copy. `load_movielens` reads it
into the `MovieLens` object training, evaluation and serving use.

Pure computing code: no Ray, no MLflow.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ncf.config import DataConfig
from ncf.data import (
    IdMaps,
    MovieLens,
    Ratings,
    Splits,
    encode_ids,
    encode_ratings,
    fold_split_indices,
    genre_matrix,
    resolve_data_dir,
    split_indices,
)
from ncf.movielens_files.ratings import read_dataset, read_fold
from ncf.movielens_files.specs import DataError, get_spec
from ncf.movielens_files.verification import (
    check_fold,
    check_sizes,
    how_verified,
    sha256_normalised,
    sizes_are_the_check,
)

FORMAT_VERSION = 1  # of the prepared folder's layout: a copy in another layout is rebuilt
MANIFEST = "manifest.json"
LIVE = "live"  # the manifest's section of a copy with live ratings (`ncf.live_training`), which is never rebuilt
STATS = "stats.json"
SPLITS = ("train", "validation", "test")
RATINGS_SCHEMA = pa.schema([("user", pa.int32()), ("movie", pa.int32()), ("rating", pa.float32()),
                            ("timestamp", pa.int64())])


def location(cfg: DataConfig) -> Path:
    """The prepared folder of dataset `data.name`."""
    root = Path(cfg.prepared_dir).expanduser() if cfg.prepared_dir else Path(cfg.cache_dir).expanduser() / "prepared"
    return root / cfg.name


def shaping_config(cfg: DataConfig) -> dict:
    """The data config a prepared copy depends on: the dataset, its split, and what its files are verified
    against (a change of any of these rebuilds it)."""
    published = cfg.published
    return {"name": cfg.name, "split": cfg.split.model_dump(mode="json"),
            "sha256": dict(sorted(published.sha256.items())),
            "sizes": published.sizes.model_dump() if published.sizes else None}


def source_files(cfg: DataConfig) -> list[str]:
    """The files a prepared copy is made from: those the reader parses (with the fold's, for the fold protocol)
    and those with a known checksum."""
    fold = cfg.split.fold if cfg.split.protocol == "fold" else None
    return sorted(set(get_spec(cfg.name).files(fold)) | set(cfg.published.sha256))


@dataclass(frozen=True)
class Prepared:
    folder: Path
    manifest: dict
    built: bool  # False: an existing copy was still valid and reused
    seconds: float

    @property
    def checksums(self) -> dict[str, str]:
        return {name: f["sha256"] for name, f in self.manifest["source"]["files"].items()}


# ----------------------------------------------------------------------------- validity


def _stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def current_manifest(cfg: DataConfig, source: Path) -> tuple[dict | None, str]:
    """(the manifest of the prepared copy, "") when it is still valid for `cfg` and the files in `source`, else
    (None, why not).

    A source file whose size and times are those recorded is taken as unchanged; one whose stat differs
    (touched, copied elsewhere, edited) is hashed again and must have the recorded digest.
    """
    folder = location(cfg)
    manifest = read_manifest(folder)
    if manifest is None:
        return None, "no prepared copy yet"
    if manifest.get("format_version") != FORMAT_VERSION:
        return None, "the prepared copy has another layout"
    if manifest.get("config") != shaping_config(cfg):
        changed = [k for k, v in shaping_config(cfg).items() if manifest.get("config", {}).get(k) != v]
        return None, f"the data config changed ({', '.join(f'data.{k}' for k in changed)})"
    if sorted(manifest.get("source", {}).get("files", {})) != source_files(cfg):
        return None, "other source files"
    if not all((folder / name).is_file() for name in manifest.get("outputs", [])):
        return None, "the prepared copy is incomplete"
    restated = False
    for name, recorded in manifest["source"]["files"].items():
        path = Path(source) / name
        try:
            now = _stat(path)
        except OSError:
            return None, f"{path} is missing"
        if any(now[k] != recorded.get(k) for k in now):
            if sha256_normalised(path) != recorded["sha256"]:
                return None, f"{path} changed"
            recorded.update(now)
            restated = True
    if restated:  # same content at a new stat (a copy, a touch): remember it, so it is not hashed again
        manifest["source"]["folder"] = str(Path(source).resolve())
        if (read_manifest(folder) or {}).get("build") == manifest.get("build"):  # still the copy we checked
            with contextlib.suppress(OSError):  # a read-only copy stays valid; it is only hashed again next time
                write_json(folder / MANIFEST, manifest)
    return manifest, ""


# ----------------------------------------------------------------------------- building


def prepare(cfg: DataConfig, source: Path, *, force: bool = False) -> Prepared:
    """The prepared copy of dataset `data.name` from the files in `source`: reused when valid, else built
    (one pass: verify, parse, validate, encode, split, write) and put in place atomically."""
    started = time.perf_counter()
    manifest, why = current_manifest(cfg, source) if not force else (None, "asked to (force)")
    if manifest is not None:
        return Prepared(location(cfg), manifest, False, time.perf_counter() - started)
    target = location(cfg)
    if LIVE in (read_manifest(target) or {}):
        raise DataError(f"{target} is a prepared copy with live ratings (make retrain) and is not valid any more "
                        f"({why}): it is never rebuilt from the source files alone; run make retrain again")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
    except OSError as err:
        raise DataError(f"cannot write the prepared data to {target.parent} ({err}); point data.prepared_dir "
                        "at a writable folder") from None
    try:
        staged.chmod(0o755)  # mkdtemp's folder is private; the prepared copy is as readable as its files
        manifest = _build(cfg, Path(source), staged)
        install(staged, target)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
            raise
        # A full disk, a quota or a file size limit while writing (pyarrow's errors do not name the file).
        raise DataError(f"cannot write the prepared data to {target} ({err}); nothing was kept: free space "
                        "there or point data.prepared_dir at another folder") from err
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    manifest = read_manifest(target) or manifest  # another process may have put an equal copy in place first
    seconds = time.perf_counter() - started
    print(f"prepared {cfg.name} in {seconds:.1f} s ({why}): {target}", file=sys.stderr)
    return Prepared(target, manifest, True, seconds)


def _build(cfg: DataConfig, source: Path, out: Path) -> dict:
    published, split = cfg.published, cfg.split
    files = {}
    for name in source_files(cfg):
        path = source / name
        if not path.is_file():
            raise DataError(f"{path} is missing")
        stat = _stat(path)
        digest = sha256_normalised(path)
        want = published.sha256.get(name)
        if want is not None and digest != want:
            raise DataError(f"{path} is corrupt or modified: sha256 {digest}, expected {want}")
        files[name] = {"sha256": digest, **stat}

    frame, movies = read_dataset(cfg.name, source)
    check_sizes(cfg.name, source, frame, movies,
                published.sizes if sizes_are_the_check(cfg.name, published.sha256) else None)
    method = how_verified(cfg.name, published.sha256, published.sizes)
    if sizes_are_the_check(cfg.name, published.sha256):
        print(method, file=sys.stderr)
    ids, movies = encode_ids(frame, movies)
    if split.protocol == "fold":
        base, test = read_fold(source, split.fold)
        check_fold(source, split.fold, frame, base, test)
        del frame
        ratings = Ratings.concat(encode_ratings(ids, base, f"{source / split.fold}.base"),
                                 encode_ratings(ids, test, f"{source / split.fold}.test"))
        rows = dict(zip(SPLITS, fold_split_indices(ratings, len(base), split), strict=True))
        del base, test
    else:
        ratings = encode_ratings(ids, frame, str(source / get_spec(cfg.name).ratings_file))
        del frame
        rows = dict(zip(SPLITS, split_indices(ratings, split), strict=True))

    stats = statistics(cfg.name, ids, movies, ratings, rows)
    for part in SPLITS:  # one split in memory at a time, beside the encoded ratings
        write_ratings(ratings.take(rows.pop(part)), out / f"{part}.parquet")
    del ratings
    write_users(ids, out)
    pq.write_table(pa.table({"movieId": movies["movieId"].to_numpy().astype(np.int32),
                             "title": pa.array(movies["title"].tolist(), pa.string()),
                             "genres": pa.array(movies["genres"].tolist(), pa.string())}), out / "movies.parquet")
    write_json(out / STATS, stats)
    manifest = {
        "format_version": FORMAT_VERSION,
        "build": uuid.uuid4().hex,  # a reader checks it did not change while it read the files
        "dataset": cfg.name,
        "config": shaping_config(cfg),
        "source": {"folder": str(source.resolve()), "files": files},
        "verification": method,
        "outputs": [f"{part}.parquet" for part in SPLITS] + ["users.parquet", "movies.parquet", STATS],
        "sizes": {part: stats["splits"][part]["ratings"] for part in SPLITS},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / MANIFEST, manifest)  # last: a folder without its manifest is never valid
    return manifest


def write_users(ids: IdMaps, folder: Path) -> None:
    """users.parquet: row i is user index i."""
    pq.write_table(pa.table({"userId": ids.user_ids.astype(np.int32)}), folder / "users.parquet")


def write_ratings(ratings: Ratings, path: Path) -> None:
    table = pa.table({"user": ratings.user.astype(np.int32, copy=False),
                      "movie": ratings.movie.astype(np.int32, copy=False),
                      "rating": ratings.rating.astype(np.float32, copy=False),
                      "timestamp": ratings.timestamp.astype(np.int64, copy=False)}, schema=RATINGS_SCHEMA)
    pq.write_table(table, path, row_group_size=1 << 20)


def write_json(path: Path, value: dict) -> None:
    """Written beside, then renamed over: never half-written."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def install(staged: Path, target: Path) -> None:
    """Put the built folder in place of `target`: a reader sees the old copy, none, or the new one."""
    try:
        os.rename(staged, target)
        return
    except OSError:
        pass  # `target` exists: a stale copy, or one another process has just built
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, old)
    try:
        os.rename(staged, target)
    except OSError:
        if read_manifest(target) is None:  # another process won the race with a complete copy: keep it
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def statistics(name: str, ids: IdMaps, movies: pd.DataFrame, ratings: Ratings, rows: dict[str, np.ndarray]) -> dict:
    """What the prepared dataset holds: sizes, rating distribution, activity and popularity, time span, genres,
    and each split's ratings and users (`rows`: each split's rows of `ratings`)."""
    per_user = np.bincount(ratings.user, minlength=ids.n_users)
    per_movie = np.bincount(ratings.movie, minlength=ids.n_movies)
    rating_values, rating_counts = np.unique(ratings.rating, return_counts=True)  # the dataset's scale, as rated
    rated = per_movie[per_movie > 0]
    genres, genre_names = genre_matrix(movies)

    def iso(ts: int) -> str:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")

    def spread(counts: np.ndarray) -> dict:
        return {"min": int(counts.min()), "median": float(np.median(counts)), "mean": round(float(counts.mean()), 2),
                "max": int(counts.max())}

    return {
        "dataset": name,
        "ratings": len(ratings),
        "users": ids.n_users,
        "movies": ids.n_movies,
        "rated_movies": len(rated),
        "density": len(ratings) / (ids.n_users * ids.n_movies),
        "rating_mean": round(float(ratings.rating.mean(dtype=np.float64)), 4),
        "rating_counts": {f"{v:.1f}": int(c) for v, c in zip(rating_values.tolist(), rating_counts, strict=True)},
        "ratings_per_user": spread(per_user),
        "ratings_per_rated_movie": spread(rated),
        "first_rating": iso(int(ratings.timestamp.min())),
        "last_rating": iso(int(ratings.timestamp.max())),
        "splits": {part: {"ratings": len(index),
                          "users": int(np.count_nonzero(np.bincount(ratings.user[index], minlength=ids.n_users)))}
                   for part, index in rows.items()},
        "genres": {g: int(n) for g, n in zip(genre_names, genres.sum(axis=0).astype(np.int64), strict=True)},
    }


# ----------------------------------------------------------------------------- reading


def _ratings(path: Path) -> Ratings:
    """A split as the in-memory `Ratings` the training loop takes (int64 indices, float64 ratings), read one
    column at a time: the peak memory is the result plus one column, not plus the whole Parquet table."""
    parquet = pq.ParquetFile(path)
    columns = {name: _column(parquet, name, dtype) for name, dtype in Ratings.DTYPES.items()}
    return Ratings(**columns)


def _column(parquet: pq.ParquetFile, name: str, dtype: type) -> np.ndarray:
    return parquet.read(columns=[name]).column(name).to_numpy().astype(dtype)  # a writable copy


class _Replaced(Exception):
    """The prepared copy was replaced while it was being read."""


def read(folder: Path, manifest: dict | None = None, splits: Collection[str] = SPLITS) -> MovieLens:
    """The `MovieLens` object of a prepared folder; the splits not in `splits` are left empty (a Ray Data
    worker reads only what its validation needs)."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder} holds no prepared data (no readable {MANIFEST}): run `make prepare`")
    users = pq.read_table(folder / "users.parquet").column("userId").to_numpy().astype(np.int64)
    table = pq.read_table(folder / "movies.parquet")
    movies = pd.DataFrame({"movieId": table.column("movieId").to_numpy().astype(np.int64),
                           "title": table.column("title").to_pylist(),  # str, as the readers give them
                           "genres": table.column("genres").to_pylist()})
    ids = IdMaps(users, movies["movieId"].to_numpy())
    genres, genre_names = genre_matrix(movies)
    wanted = Splits(*(_ratings(folder / f"{part}.parquet") if part in splits else Ratings.none() for part in SPLITS))
    if (read_manifest(folder) or {}).get("build") != manifest.get("build"):
        raise _Replaced(folder)  # another process rebuilt it meanwhile: the files may be of two builds
    checksums = {name: f["sha256"] for name, f in manifest["source"]["files"].items()}
    return MovieLens(ids, movies, genres, genre_names, wanted, checksums)


def load_movielens(cfg: DataConfig, folder: Path | None = None, attempts: int = 3) -> MovieLens:
    """Dataset `data.name`, verified, encoded and split with `data.split`, read from its prepared copy, which is
    built first when it is missing or stale (a source file or the data config changed). `folder` holds the
    source files; by default they are found as `ncf.data.resolve_data_dir` finds them."""
    source = Path(folder) if folder else resolve_data_dir(cfg)
    for attempt in range(attempts):
        prepared = prepare(cfg, source)
        try:
            return read(prepared.folder, prepared.manifest)
        except (_Replaced, FileNotFoundError):  # replaced by another process while we read: look again
            if attempt == attempts - 1:
                raise DataError(f"{prepared.folder} kept being replaced while it was read ({attempts} times): "
                                "is another process preparing the same dataset with another data config?") from None
    raise AssertionError("unreachable")
