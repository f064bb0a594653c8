"""Verifying a published dataset: its files' SHA-256 digests (CRLF normalised), every line parsed and
validated, the published sizes where no digest is known, and each ml-100k fold against the whole."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from ncf.movielens_files.ratings import read_dataset, read_fold
from ncf.movielens_files.specs import DataError, get_spec


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
        path = Path(folder) / name
        if not path.is_file():
            raise DataError(f"{path} is missing")
        got = sha256_normalised(path)
        if got != want:
            raise DataError(f"{path} is corrupt or modified: sha256 {got}, expected {want}")
        digests[name] = got
    return digests


class Sizes(Protocol):
    """A dataset's published sizes (config: `data.datasets.<name>.sizes`)."""

    ratings: int  # rows of the ratings file
    users: int  # distinct users
    movies: int  # rows of the movies file (some movies have no rating)


def sizes_are_the_check(name: str, sha256: Mapping[str, str]) -> bool:
    """Where the ratings and movies files both have a known digest, a match is the verification; where
    either has none, the published sizes are checked (after every line has been parsed and validated)."""
    spec = get_spec(name)
    return not {spec.ratings_file, spec.movies_file} <= set(sha256)


def how_verified(name: str, sha256: Mapping[str, str], sizes: Sizes | None) -> str:
    """One line for the log: what the verification of dataset `name` rested on."""
    spec = get_spec(name)
    if not sizes_are_the_check(name, sha256):
        return f"{name}: SHA-256 of {', '.join(sorted(sha256))} matched; every line parsed and validated"
    files = f"{spec.ratings_file}, {spec.movies_file}"
    if sizes is not None:
        return (f"{name}: no SHA-256 known for {files}: every line parsed and validated, and the sizes match "
                f"the published ones ({sizes.ratings:,} ratings, {sizes.users:,} users, {sizes.movies:,} movies)")
    return (f"{name}: no SHA-256 and no published sizes known for {files}: every line parsed and validated "
            "(structure only)")


def check_sizes(name: str, folder: Path, ratings: pd.DataFrame, movies: pd.DataFrame,
                sizes: Sizes | None) -> dict[str, int]:
    """The sizes found (ratings rows, distinct users, movies rows); a DataError where they differ from `sizes`."""
    spec = get_spec(name)
    found = {"ratings": len(ratings), "users": int(pd.unique(ratings["userId"]).size), "movies": len(movies)}
    for what, count in found.items():
        published = getattr(sizes, what) if sizes is not None else None
        if published is not None and count != published:
            file = spec.movies_file if what == "movies" else spec.ratings_file
            raise DataError(f"{Path(folder) / file}: {count:,} {what}, but the published {name} has {published:,}: "
                            f"truncated, extended or another dataset (for a folder that is not the published "
                            f"dataset, e.g. a synthetic one, set data.datasets.{name}.sizes=null)")
    return found


@dataclass(frozen=True)
class Verification:
    """What `verify` checked: the digests it compared, the sizes it found, and how (a line for the log)."""

    name: str
    sha256: dict[str, str]
    ratings: int
    users: int
    movies: int
    folds: dict[str, tuple[int, int]]  # name -> (train rows, test rows)
    method: str


def verify(name: str, folder: Path, *, sha256: Mapping[str, str] | None = None,
           sizes: Sizes | None = None) -> Verification:
    """Verify dataset `name` in `folder`, or raise a DataError that names the file.

    Files with a known digest (`sha256`: config `data.datasets.<name>.sha256`) must match it, CRLF
    normalised. Every line is then parsed and validated, and where the ratings and movies files have
    no known digest, the sizes (ratings, distinct users, movies) must equal the published `sizes`
    (None: not compared, for fixtures and synthetic data): that structure + count check is the
    verification of the datasets without known digests. Folds, where the dataset has them, must each
    split all the ratings into disjoint train and test parts.
    """
    spec, folder, sha256 = get_spec(name), Path(folder), dict(sha256 or {})
    digests = verify_checksums(folder, sha256)
    ratings, movies = read_dataset(name, folder)
    found = check_sizes(name, folder, ratings, movies, sizes if sizes_are_the_check(name, sha256) else None)
    folds = {}
    for fold in spec.folds:
        if not (folder / f"{fold}.base").is_file() and not (folder / f"{fold}.test").is_file():
            continue  # folds are optional
        train, test = read_fold(folder, fold)
        check_fold(folder, fold, ratings, train, test)
        folds[fold] = (len(train), len(test))
    return Verification(name, digests, found["ratings"], found["users"], found["movies"], folds,
                        how_verified(name, sha256, sizes))


def check_fold(folder: Path, fold: str, ratings: pd.DataFrame, train: pd.DataFrame, test: pd.DataFrame) -> None:
    """A fold's train and test parts are disjoint and together are all the ratings (u.data)."""

    def keys(frame: pd.DataFrame) -> np.ndarray:
        return (frame["userId"].to_numpy(np.int64) << 32) | frame["movieId"].to_numpy(np.int64)

    shared = np.intersect1d(keys(train), keys(test))
    if len(shared):
        raise DataError(f"{folder / fold}.test shares {len(shared)} (user, movie) pair(s) with {fold}.base")
    if not np.array_equal(np.sort(np.concatenate([keys(train), keys(test)])), np.sort(keys(ratings))):
        raise DataError(f"{folder / fold}.base + {fold}.test ({len(train) + len(test):,} rows) are not "
                        f"the {len(ratings):,} ratings of u.data")
