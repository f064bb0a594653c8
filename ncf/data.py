"""MovieLens data: locate or download + verify the files, encode ids, split.

Every dataset of the MovieLens family (`data.name`) is read by the typed readers of `ncf.movielens_files`;
`ncf.prepared.load_movielens` gets it through its prepared copy (typed Parquet, built once from this
module's encoding and splits, rebuilt when a source file or the data config changes). Everything
downstream works on contiguous integer indices held in tensors; the `IdMaps` that translate raw MovieLens
ids travel with every saved model.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from ncf.config import DataConfig, SplitConfig

# DataError, NO_GENRES and the digests are re-exported: the data layer's vocabulary
from ncf.movielens_files.specs import NO_GENRES, DataError, get_spec
from ncf.movielens_files.verification import (
    sha256_normalised,  # noqa: F401
    sizes_are_the_check,
    verify,
    verify_checksums,
)

# ----------------------------------------------------------------------------- files


def _progress(label: str, done: int, total: int) -> None:
    if total > 0:
        print(f"\r{label}: {done / 2**20:.1f} / {total / 2**20:.1f} MiB", end="", file=sys.stderr, flush=True)


def download_archive(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Stream `url` to `dest`, refusing a body shorter than its Content-Length."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 16):
                out.write(chunk)
                done += len(chunk)
                _progress(f"downloading {url}", done, total)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError) as err:
        raise DataError(f"could not download {url} ({err}); without network access, point NCF_DATA_DIR "
                        "(or data.dir) at a folder holding the MovieLens files") from None
    print(file=sys.stderr)
    if total and done != total:
        raise DataError(f"download of {url} is truncated: {done} of {total} bytes")


def _extract_lf(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, block: int = 1 << 24) -> None:
    """One archive member to `dest` with CRLF turned into LF, streamed (ratings files are GBs)."""
    carry = b""
    with zf.open(info) as src, open(dest, "wb") as out:
        while chunk := src.read(block):
            data = carry + chunk
            carry = b"\r" if data.endswith(b"\r") else b""  # a CRLF may straddle two reads
            out.write(data[: len(data) - len(carry)].replace(b"\r\n", b"\n"))
        out.write(carry)


def _wanted(cfg: DataConfig) -> set[str]:
    """The archive members kept: what the reader parses (every fold), the checksummed files, the README."""
    spec = get_spec(cfg.name)
    return set(spec.files()) | {f for fold in spec.folds for f in (f"{fold}.base", f"{fold}.test")} | set(
        cfg.published.sha256)


def download_dataset(cfg: DataConfig) -> Path:
    """Download, verify and extract the archive of dataset `data.name` into `cache_dir`/<name>;
    atomic: all or nothing.

    The files are written with LF line endings so the cache matches the checksums. Where the parsed
    files have no known checksum, every line is parsed and the sizes compared with the published ones
    before the folder is kept (`ncf.movielens_files.verification.verify`); the log says which verification was done.
    """
    published = cfg.published
    target = Path(cfg.cache_dir).expanduser() / cfg.name
    if target.is_dir():
        verify_checksums(target, published.sha256)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wanted = _wanted(cfg)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        archive = Path(tmp) / "archive.zip"
        download_archive(published.url, archive)
        staged = Path(tmp) / cfg.name
        staged.mkdir()
        try:
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    name = Path(info.filename).name
                    if not info.is_dir() and (name in wanted or name.upper().startswith("README")):
                        _extract_lf(zf, info, staged / name)
        except (zipfile.BadZipFile, EOFError, zlib.error) as err:
            raise DataError(f"archive from {published.url} is corrupt: {err}") from None
        verify_checksums(staged, published.sha256)
        if sizes_are_the_check(cfg.name, published.sha256):
            print(verify(cfg.name, staged, sha256=published.sha256, sizes=published.sizes).method, file=sys.stderr)
        os.replace(staged, target)
    return target


def resolve_data_dir(cfg: DataConfig) -> Path:
    """NCF_DATA_DIR, else `data.dir`, else a verified download into the cache.

    A configured folder may hold the dataset's files or a `<data.name>` subfolder that does
    (NCF_DATA_DIR=/datasets serves /datasets/ml-1m when data.name is ml-1m).
    """
    configured = os.environ.get("NCF_DATA_DIR") or cfg.dir
    if configured:
        folder = Path(configured).expanduser().resolve()
        if not folder.is_dir():
            raise DataError(f"data folder {folder} does not exist (from NCF_DATA_DIR or data.dir)")
        return folder / cfg.name if (folder / cfg.name).is_dir() else folder
    return download_dataset(cfg)


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class IdMaps:
    """Raw MovieLens ids <-> contiguous indices; movies span the whole catalogue."""

    user_ids: np.ndarray  # index -> raw userId, sorted
    movie_ids: np.ndarray  # index -> raw movieId, sorted

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_movies(self) -> int:
        return len(self.movie_ids)

    def _lookup(self, table: np.ndarray, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.int64)
        pos = np.searchsorted(table, raw).clip(0, len(table) - 1)
        return np.where(table[pos] == raw, pos, -1)

    def user_index(self, raw: np.ndarray) -> np.ndarray:
        """Indices for raw user ids; -1 where the id is unknown."""
        return self._lookup(self.user_ids, raw)

    def movie_index(self, raw: np.ndarray) -> np.ndarray:
        """Indices for raw movie ids; -1 where the id is unknown."""
        return self._lookup(self.movie_ids, raw)

    def user_position(self, raw: int) -> int | None:
        """The index of one raw user id, None if unknown: a dict lookup (0.1 us) where `user_index` costs about
        7 us of numpy calls for a single id (every /recommend looks one up)."""
        return self._user_positions.get(int(raw))

    @cached_property
    def _user_positions(self) -> dict[int, int]:  # built at the first single-id lookup, not by training
        return dict(zip(self.user_ids.tolist(), range(self.n_users), strict=True))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"user_ids": self.user_ids.tolist(), "movie_ids": self.movie_ids.tolist()}))

    @classmethod
    def load(cls, path: Path) -> IdMaps:
        raw = json.loads(Path(path).read_text())
        return cls(np.asarray(raw["user_ids"], dtype=np.int64), np.asarray(raw["movie_ids"], dtype=np.int64))


def genre_matrix(movies: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Multi-hot genres (n_movies x n_genres), rows in the order of `movies`."""
    lists = [[] if g == NO_GENRES else g.split("|") for g in movies["genres"]]
    names = sorted({g for genres in lists for g in genres})
    column = {g: i for i, g in enumerate(names)}
    matrix = np.zeros((len(lists), len(names)), dtype=np.float32)
    for row, genres in enumerate(lists):
        matrix[row, [column[g] for g in genres]] = 1.0
    return matrix, names


def encode_ids(ratings: pd.DataFrame, movies: pd.DataFrame) -> tuple[IdMaps, pd.DataFrame]:
    """Id maps (users: those who rated; movies: the whole catalogue) and the movies sorted by id, so that
    row i is movie index i. `ratings` and `movies` are the typed frames of `ncf.movielens_files`."""
    movies = movies.sort_values("movieId", kind="stable").reset_index(drop=True)
    users = np.unique(ratings["userId"].to_numpy()).astype(np.int64)
    return IdMaps(users, movies["movieId"].to_numpy().astype(np.int64)), movies


def encode_ratings(ids: IdMaps, frame: pd.DataFrame, file: str = "ratings") -> Ratings:
    """Compact encoded ratings (int32 indices, float32 ratings, int64 timestamps), in the frame's order."""
    user = _index(ids.user_ids, frame["userId"].to_numpy(), "userId", file)
    movie = _index(ids.movie_ids, frame["movieId"].to_numpy(), "movieId", file)
    return Ratings(user, movie, frame["rating"].to_numpy(np.float32), frame["timestamp"].to_numpy(np.int64))


def _index(table: np.ndarray, raw: np.ndarray, what: str, file: str) -> np.ndarray:
    """int32 positions of `raw` in the sorted `table`, chunk by chunk (bounded temporaries at 25M rows):
    through a lookup table where the ids are small (MovieLens' are below a million), else a binary search."""
    lut = None
    if len(table) and int(table[0]) >= 0 and int(table[-1]) < (1 << 25):
        lut = np.full(int(table[-1]) + 1, -1, dtype=np.int32)
        lut[table] = np.arange(len(table), dtype=np.int32)
    out = np.empty(len(raw), dtype=np.int32)
    step = 1 << 22
    for start in range(0, len(raw), step):
        part = raw[start: start + step]
        if lut is not None:
            clipped = np.clip(part, 0, len(lut) - 1)
            pos = lut[clipped]
            unknown = (pos < 0) | (clipped != part)
        else:
            pos = np.searchsorted(table, part).clip(0, max(len(table) - 1, 0))
            unknown = table[pos] != part
        if unknown.any():
            sample = np.unique(part[unknown])[:5].tolist()
            raise DataError(f"{file}: {int(unknown.sum())} rating(s) of unknown {what}s, e.g. {sample}")
        out[start: start + len(part)] = pos
    return out


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Ratings:
    """Encoded ratings as aligned arrays, typed as `DTYPES`."""

    DTYPES: ClassVar[dict[str, type]] = {"user": np.int64, "movie": np.int64, "rating": np.float64,
                                         "timestamp": np.int64}
    user: np.ndarray
    movie: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    @classmethod
    def none(cls) -> Ratings:
        return cls(**{name: np.zeros(0, dtype) for name, dtype in cls.DTYPES.items()})

    @classmethod
    def concat(cls, *parts: Ratings) -> Ratings:
        """The rows of `parts`, one after the other."""
        return cls(*(np.concatenate([getattr(part, name) for part in parts]) for name in cls.DTYPES))

    def take(self, index: np.ndarray) -> Ratings:
        return Ratings(self.user[index], self.movie[index], self.rating[index], self.timestamp[index])

    def digest(self) -> str:
        """SHA-256 of the rows (each column in its `DTYPES`, in order), 32 hex digits: names this exact data wherever
        it is logged (MLflow's dataset inputs take at most 36 characters)."""
        sha = hashlib.sha256()
        for name, dtype in self.DTYPES.items():
            sha.update(np.ascontiguousarray(getattr(self, name), dtype=dtype).tobytes())
        return sha.hexdigest()[:32]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.user), torch.from_numpy(self.movie),
                torch.from_numpy(self.rating.astype(np.float32)))


def _by_user_then_time(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """The stable order by (user, timestamp): `np.lexsort((timestamp, user))`, computed as one stable argsort of
    a combined int64 key where it fits (several times faster on the large datasets, the same order)."""
    if not len(user):
        return np.arange(0)
    low, span = int(timestamp.min()), int(timestamp.max()) - int(timestamp.min()) + 1
    if int(user.min()) < 0 or (int(user.max()) + 1) * span >= 2**62:
        return np.lexsort((timestamp, user))
    key = user.astype(np.int64) * span
    key += timestamp - low
    return np.argsort(key, kind="stable")


def _per_user_tail(user: np.ndarray, timestamp: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of each user's last n - floor((1 - fraction) * n) ratings by time (stable sort)."""
    order = _by_user_then_time(user, timestamp)
    users_sorted = user[order]
    counts = np.bincount(users_sorted)
    first = np.cumsum(counts) - counts  # where each user's ratings start in the sorted order
    keep_head = np.floor((1.0 - fraction) * counts + 1e-9).astype(np.int64)
    position = np.int32 if len(order) < 2**31 else np.int64  # halves the two row-sized temporaries
    tail_sorted = np.arange(len(order), dtype=position) >= (first + keep_head).astype(position)[users_sorted]
    del users_sorted
    mask = np.zeros(len(order), dtype=bool)
    mask[order] = tail_sorted
    return mask


def _split_mask(user: np.ndarray, timestamp: np.ndarray, fraction: float, protocol: str,
                rng: np.random.Generator) -> np.ndarray:
    """Mask of the rows held out (the `fraction` part) under `protocol`."""
    n = len(user)
    if protocol == "seed":
        return _per_user_tail(user, timestamp, fraction)
    if protocol == "temporal":
        order = np.argsort(timestamp, kind="stable")
        mask = np.zeros(n, dtype=bool)
        mask[order[int(np.floor((1.0 - fraction) * n)):]] = True
        return mask
    if protocol == "random":
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[: int(round(fraction * n))]] = True
        return mask
    if protocol == "fold":
        raise ValueError("the fold protocol uses the dataset's own split files (fold_split_indices, through "
                         "load_movielens)")
    raise ValueError(f"unknown split protocol '{protocol}'")


@dataclass(frozen=True)
class Splits:
    train: Ratings
    validation: Ratings
    test: Ratings

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}

    def train_and_validation(self) -> Ratings:
        """Everything but the test split: what refits, baselines and "already seen" use."""
        return Ratings.concat(self.train, self.validation)


def split_indices(ratings: Ratings, cfg: SplitConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of `ratings` in (train, validation, test): the test split by protocol, then a validation slice
    carved from train the same way.

    For the seed and temporal protocols the validation slice is the most recent part
    of train, so early stopping imitates predicting the future, never sees the test set.
    """
    rng = np.random.default_rng(cfg.seed)
    test_mask = _split_mask(ratings.user, ratings.timestamp, cfg.test_fraction, cfg.protocol, rng)
    test, train_full = np.flatnonzero(test_mask), np.flatnonzero(~test_mask)
    del test_mask
    val_protocol = "random" if cfg.protocol == "random" else "seed"
    val_mask = _split_mask(ratings.user[train_full], ratings.timestamp[train_full], cfg.validation_fraction,
                           val_protocol, rng)
    return train_full[~val_mask], train_full[val_mask], test


def fold_split_indices(ratings: Ratings, n_train: int, cfg: SplitConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows in (train, validation, test) under the protocol `fold`, a split the dataset ships (ml-100k's
    <fold>.base and <fold>.test): `ratings` holds the fold's train rows, then its test rows. The validation
    slice is carved from its train part as the seed and temporal protocols carve it (the last
    `validation_fraction` of each user's train ratings by time)."""
    train_full = np.arange(n_train)
    val_mask = _per_user_tail(ratings.user[:n_train], ratings.timestamp[:n_train], cfg.validation_fraction)
    return train_full[~val_mask], train_full[val_mask], np.arange(n_train, len(ratings))


def split_ratings(ratings: Ratings, cfg: SplitConfig) -> Splits:
    """The (train, validation, test) `Splits` of `split_indices`."""
    return Splits(*(ratings.take(rows) for rows in split_indices(ratings, cfg)))


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class MovieLens:
    """Everything training, evaluation and serving need, encoded and split."""

    ids: IdMaps
    movies: pd.DataFrame  # movieId, title, genres; row i is movie index i
    genres: np.ndarray  # n_movies x n_genres multi-hot
    genre_names: list[str]
    splits: Splits
    checksums: dict[str, str]  # SHA-256 of every source file (LF line endings): logged with each run

    @property
    def n_users(self) -> int:
        return self.ids.n_users

    @property
    def n_movies(self) -> int:
        return self.ids.n_movies
