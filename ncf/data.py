"""MovieLens data: locate or download, verify, validate, encode, split, batch.

Everything downstream works on contiguous integer indices held in tensors; the
`IdMaps` that translate raw MovieLens ids travel with every saved model.
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ncf.config import DataConfig, SplitConfig

RATING_STEPS = np.arange(1, 11) / 2.0  # 0.5, 1.0, ..., 5.0
NO_GENRES = "(no genres listed)"


class DataError(ValueError):
    """The data is missing, corrupt or violates the schema; the message says where."""


# ----------------------------------------------------------------------------- files


def sha256_normalised(path: Path, block: int = 1 << 24) -> str:
    """SHA-256 of a text file with CRLF line endings turned into LF, streamed `block` bytes at a time
    (the large MovieLens files are GBs)."""
    digest = hashlib.sha256()
    carry = b""
    with open(path, "rb") as f:
        while chunk := f.read(block):
            data = carry + chunk
            carry = b"\r" if data.endswith(b"\r") else b""  # a CRLF may straddle two reads
            digest.update(data[: len(data) - len(carry)].replace(b"\r\n", b"\n"))
    digest.update(carry)
    return digest.hexdigest()


def verify_checksums(folder: Path, expected: Mapping[str, str]) -> dict[str, str]:
    """Check every file named in `expected`; return the digests (logged with each run)."""
    digests = {}
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing")
        got = sha256_normalised(path)
        if got != want:
            raise DataError(f"{path} is corrupt or modified: sha256 {got}, expected {want}")
        digests[name] = got
    return digests


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


def download_dataset(cfg: DataConfig) -> Path:
    """Download, verify and extract the archive into the cache; atomic: all or nothing.

    The files are written with LF line endings so the cache matches the checksums.
    """
    target = Path(cfg.cache_dir).expanduser() / "ml-latest-small"
    if target.is_dir():
        verify_checksums(target, cfg.sha256)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        archive = Path(tmp) / "archive.zip"
        download_archive(cfg.url, archive)
        staged = Path(tmp) / "ml-latest-small"
        staged.mkdir()
        try:
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    name = Path(info.filename).name
                    if info.is_dir() or not name.endswith((".csv", ".txt")):
                        continue
                    (staged / name).write_bytes(zf.read(info).replace(b"\r\n", b"\n"))
        except (zipfile.BadZipFile, EOFError, zlib.error) as err:
            raise DataError(f"archive from {cfg.url} is corrupt: {err}") from None
        verify_checksums(staged, cfg.sha256)
        os.replace(staged, target)
    return target


def resolve_data_dir(cfg: DataConfig) -> Path:
    """NCF_DATA_DIR, else `data.dir`, else a verified download into the cache."""
    configured = os.environ.get("NCF_DATA_DIR") or cfg.dir
    if configured:
        folder = Path(configured).expanduser().resolve()
        if not folder.is_dir():
            raise DataError(f"data folder {folder} does not exist (from NCF_DATA_DIR or data.dir)")
        return folder
    return download_dataset(cfg)


# ----------------------------------------------------------------------------- schema


def _bad_rows(mask: np.ndarray, frame: pd.DataFrame, what: str, file: str) -> None:
    if mask.any():
        rows = np.flatnonzero(mask)
        # Line numbers in the file: +2 for the header and 1-based counting.
        shown = ", ".join(f"line {r + 2}: {frame.iloc[r].to_dict()}" for r in rows[:5])
        more = f" (and {len(rows) - 5} more)" if len(rows) > 5 else ""
        raise DataError(f"{file}: {len(rows)} row(s) with {what}: {shown}{more}")


def _integer_column(frame: pd.DataFrame, column: str, file: str) -> np.ndarray:
    numeric = pd.to_numeric(frame[column], errors="coerce")
    values = numeric.to_numpy(dtype=float)
    _bad_rows(~np.isfinite(values) | (values != np.round(values)), frame, f"non-integer {column}", file)
    return values.astype(np.int64)


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path} cannot be parsed as CSV: {err}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; found {list(frame.columns)}")
    return frame


def validate_ratings(frame: pd.DataFrame, file: str = "ratings.csv") -> pd.DataFrame:
    """Typed ratings, or a DataError naming the offending rows."""
    users = _integer_column(frame, "userId", file)
    movies = _integer_column(frame, "movieId", file)
    stamps = _integer_column(frame, "timestamp", file)
    ratings = pd.to_numeric(frame["rating"], errors="coerce").to_numpy(dtype=float)
    _bad_rows(~np.isin(ratings, RATING_STEPS), frame, "rating not in {0.5, 1.0, ..., 5.0}", file)
    typed = pd.DataFrame({"userId": users, "movieId": movies, "rating": ratings, "timestamp": stamps})
    _bad_rows(typed.duplicated(["userId", "movieId"], keep="first").to_numpy(), frame,
              "a duplicate (userId, movieId)", file)
    return typed


def validate_movies(frame: pd.DataFrame, file: str = "movies.csv") -> pd.DataFrame:
    ids = _integer_column(frame, "movieId", file)
    typed = pd.DataFrame({"movieId": ids, "title": frame["title"], "genres": frame["genres"]})
    _bad_rows(typed.duplicated("movieId").to_numpy(), frame, "a duplicate movieId", file)
    return typed


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


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Ratings:
    """Encoded ratings as aligned arrays."""

    user: np.ndarray
    movie: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index: np.ndarray) -> Ratings:
        return Ratings(self.user[index], self.movie[index], self.rating[index], self.timestamp[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.user), torch.from_numpy(self.movie),
                torch.from_numpy(self.rating.astype(np.float32)))


def _per_user_tail(ratings: Ratings, fraction: float) -> np.ndarray:
    """Mask of each user's last floor(fraction * n) ratings by time (stable sort)."""
    order = np.lexsort((ratings.timestamp, ratings.user))  # by user, then time; stable
    users_sorted = ratings.user[order]
    starts = np.searchsorted(users_sorted, users_sorted, side="left")
    counts = np.bincount(users_sorted)[users_sorted]
    rank = np.arange(len(order)) - starts
    keep_head = np.floor((1.0 - fraction) * counts + 1e-9).astype(np.int64)
    tail_sorted = rank >= keep_head
    mask = np.zeros(len(order), dtype=bool)
    mask[order] = tail_sorted
    return mask


def _split_mask(ratings: Ratings, fraction: float, protocol: str, rng: np.random.Generator) -> np.ndarray:
    """Mask of the rows held out (the `fraction` part) under `protocol`."""
    if protocol == "seed":
        return _per_user_tail(ratings, fraction)
    if protocol == "temporal":
        order = np.argsort(ratings.timestamp, kind="stable")
        mask = np.zeros(len(ratings), dtype=bool)
        mask[order[int(np.floor((1.0 - fraction) * len(ratings))):]] = True
        return mask
    if protocol == "random":
        mask = np.zeros(len(ratings), dtype=bool)
        mask[rng.permutation(len(ratings))[: int(round(fraction * len(ratings)))]] = True
        return mask
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
        return Ratings(*(np.concatenate([getattr(self.train, f), getattr(self.validation, f)])
                         for f in ("user", "movie", "rating", "timestamp")))


def split_ratings(ratings: Ratings, cfg: SplitConfig) -> Splits:
    """Test split by protocol, then a validation slice carved from train the same way.

    For the seed and temporal protocols the validation slice is the most recent part
    of train, so early stopping imitates predicting the future, never sees the test set.
    """
    rng = np.random.default_rng(cfg.seed)
    test_mask = _split_mask(ratings, cfg.test_fraction, cfg.protocol, rng)
    train_full = ratings.take(np.flatnonzero(~test_mask))
    val_protocol = "random" if cfg.protocol == "random" else "seed"
    val_mask = _split_mask(train_full, cfg.validation_fraction, val_protocol, rng)
    return Splits(
        train=train_full.take(np.flatnonzero(~val_mask)),
        validation=train_full.take(np.flatnonzero(val_mask)),
        test=ratings.take(np.flatnonzero(test_mask)),
    )


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class MovieLens:
    """Everything training, evaluation and serving need, encoded and split."""

    ids: IdMaps
    movies: pd.DataFrame  # movieId, title, genres; row i is movie index i
    genres: np.ndarray  # n_movies x n_genres multi-hot
    genre_names: list[str]
    splits: Splits
    checksums: dict[str, str]

    @property
    def n_users(self) -> int:
        return self.ids.n_users

    @property
    def n_movies(self) -> int:
        return self.ids.n_movies


def load_movielens(cfg: DataConfig, folder: Path | None = None) -> MovieLens:
    """Verify, validate, encode and split; `folder` bypasses the lookup (tests)."""
    folder = Path(folder) if folder else resolve_data_dir(cfg)
    checksums = verify_checksums(folder, cfg.sha256)
    raw = validate_ratings(_read_csv(folder / "ratings.csv", ("userId", "movieId", "rating", "timestamp")))
    movies = validate_movies(_read_csv(folder / "movies.csv", ("movieId", "title", "genres")))
    return encode_movielens(raw, movies, cfg.split, checksums)


def encode_movielens(raw: pd.DataFrame, movies: pd.DataFrame, split: SplitConfig,
                     checksums: dict[str, str] | None = None) -> MovieLens:
    movies = movies.sort_values("movieId", kind="stable").reset_index(drop=True)
    ids = IdMaps(np.unique(raw["userId"].to_numpy()), movies["movieId"].to_numpy(dtype=np.int64))
    movie_idx = ids.movie_index(raw["movieId"].to_numpy())
    unknown = movie_idx < 0
    if unknown.any():
        sample = raw.loc[unknown, "movieId"].unique()[:5].tolist()
        raise DataError(f"ratings.csv: {int(unknown.sum())} rating(s) of movies absent from movies.csv, e.g. {sample}")
    ratings = Ratings(
        user=ids.user_index(raw["userId"].to_numpy()),
        movie=movie_idx,
        rating=raw["rating"].to_numpy(dtype=np.float64),
        timestamp=raw["timestamp"].to_numpy(dtype=np.int64),
    )
    genres, genre_names = genre_matrix(movies)
    return MovieLens(ids, movies, genres, genre_names, split_ratings(ratings, split), checksums or {})


# ----------------------------------------------------------------------------- batches


def epoch_batches(
    tensors: tuple[torch.Tensor, ...],
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """This rank's batches of one epoch, sliced from in-memory tensors.

    Every rank draws the same seeded permutation and takes every `world_size`-th
    sample, truncated so all ranks run the same number of steps (DDP needs that).
    """
    n = len(tensors[0])
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    per_rank = n // world_size
    mine = order[rank: per_rank * world_size: world_size]
    for start in range(0, per_rank, batch_size):
        index = mine[start: start + batch_size]
        yield tuple(t[index] for t in tensors)
