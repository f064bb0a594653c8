"""Live ratings as training data (`make retrain`): the cut, the fresh hold-out after it, and the prepared copy of the
dataset with the live ratings up to the cut in its train split.

The store's live ratings, by seq (the order the store received them), are cut in two: the oldest join the
training data, the newest `retrain.holdout_fraction` of them are the fresh hold-out that champion and challenger
are compared on. `write_live_copy` writes a prepared folder in `ncf.prepared`'s layout that `load_movielens`
(and so every Ray Train worker) reads like any other:

- users.parquet: the dataset's users, then the live-only users (ids above the dataset's, as POST /users hands
  them out) appended in id order, so every dataset user keeps its index;
- train.parquet: the dataset's train ratings plus the live ratings up to the cut; a (user, movie) pair rated again
  counts once, with its latest rating (a live rating replaces the dataset's, in whichever split that was: a pair
  the user rated live is training data, never a held-out target);
- manifest.json: the dataset copy's, plus a `live` section (cut_seq, ratings, sha256 of the live ratings used,
  holdout_ratings, ...). `ncf.prepared.prepare` never rebuilds such a copy from the source files.

Pure computing code: no Ray, no MLflow.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ncf.data import IdMaps, Ratings
from ncf.feedback_store import LiveRating
from ncf.movielens_files.specs import DataError
from ncf.prepared import (
    LIVE,
    MANIFEST,
    SPLITS,
    STATS,
    install,
    read,
    read_manifest,
    statistics,
    write_json,
    write_ratings,
    write_users,
)


@dataclass(frozen=True)
class LiveCut:
    """The live ratings split at a seq: `training` (seq <= cut_seq, oldest first) and the fresh `holdout` after it."""

    training: tuple[LiveRating, ...]
    holdout: tuple[LiveRating, ...]

    @property
    def cut_seq(self) -> int:
        """The seq of the last live rating trained on (0: none)."""
        return self.training[-1].seq if self.training else 0

    @property
    def sha256(self) -> str:
        return checksum(self.training)

    def record(self) -> dict[str, int | str]:
        """What says which live ratings a model saw: the manifest's `live` section, the run's and version's tags."""
        return {"cut_seq": self.cut_seq, "ratings": len(self.training), "sha256": self.sha256,
                "holdout_ratings": len(self.holdout)}


def cut(live: Sequence[LiveRating], holdout_fraction: float) -> LiveCut:
    """The newest `holdout_fraction` of `live` by seq (at least one rating, and at least one left to train on when
    there are two or more) as the hold-out; the rest, up to the cut, for training."""
    ordered = sorted(live, key=lambda r: r.seq)
    n_holdout = min(len(ordered) - 1, max(1, round(len(ordered) * holdout_fraction))) if len(ordered) > 1 else 0
    at = len(ordered) - n_holdout
    return LiveCut(tuple(ordered[:at]), tuple(ordered[at:]))


def checksum(ratings: Sequence[LiveRating]) -> str:
    """SHA-256 of the ratings as stored (seq, event id, user, movie, rating, timestamp), in seq order: the same
    ratings give the same digest whatever order they are given in."""
    digest = hashlib.sha256()
    for r in sorted(ratings, key=lambda r: r.seq):
        digest.update(f"{r.seq}\t{r.event_id}\t{r.user_id}\t{r.movie_id}\t{float(r.rating)!r}\t{r.timestamp}\n"
                      .encode())
    return digest.hexdigest()


def latest_per_pair(ratings: Sequence[LiveRating]) -> list[LiveRating]:
    """Each (user, movie) pair's latest rating (by seq), in seq order."""
    latest = {(r.user_id, r.movie_id): r for r in sorted(ratings, key=lambda r: r.seq)}
    return sorted(latest.values(), key=lambda r: r.seq)


def pair_keys(users: np.ndarray, movies: np.ndarray) -> np.ndarray:
    """One int64 per (user, movie) pair (indices or raw ids below 2**31)."""
    return np.asarray(users, dtype=np.int64) << 32 | np.asarray(movies, dtype=np.int64)


def extended_users(dataset_users: np.ndarray, live: Sequence[LiveRating]) -> np.ndarray:
    """The dataset's user ids, then the live-only ones in id order: dataset users keep their indices. Live-only
    ids must be above the dataset's (as POST /users hands them out), so the ids stay sorted."""
    new = np.setdiff1d(np.asarray([r.user_id for r in live], dtype=np.int64), dataset_users)
    if len(new) and len(dataset_users) and new[0] < dataset_users[-1]:
        raise DataError(f"live user {int(new[0])} is not in the dataset but below its largest user id "
                        f"({int(dataset_users[-1])}): live-only users must have ids above the dataset's")
    return np.concatenate([dataset_users, new])


def encoded(live: Sequence[LiveRating], ids: IdMaps) -> tuple[Ratings, int]:
    """The live ratings in `ids`' indices, and how many were left out for a movie the dataset does not know."""
    users = ids.user_index(np.asarray([r.user_id for r in live], dtype=np.int64))
    movies = ids.movie_index(np.asarray([r.movie_id for r in live], dtype=np.int64))
    known = movies >= 0
    rated = Ratings(users[known], movies[known], np.asarray([r.rating for r in live], dtype=np.float64)[known],
                    np.asarray([r.timestamp for r in live], dtype=np.int64)[known])
    return rated, int((~known).sum())


def live_location(root: Path, live: LiveCut, dataset: str) -> Path:
    """The prepared folder of one cut: <root>/cut-<seq>-<digest>/<dataset> (the `data.prepared_dir` of its run)."""
    return Path(root).expanduser() / f"cut-{live.cut_seq}-{live.sha256[:12]}" / dataset


def write_live_copy(base: Path, live: LiveCut, target: Path) -> dict:
    """Write the dataset's prepared copy in `base` with `live.training` added (module docstring) to `target`,
    atomically (a reader sees the old copy, none, or the new one); returns its manifest."""
    manifest = read_manifest(base)
    if manifest is None or LIVE in manifest:
        raise DataError(f"{base} is no prepared copy of a dataset alone")
    data = read(base, manifest)
    ids = IdMaps(extended_users(data.ids.user_ids, live.training), data.ids.movie_ids)
    rated, unknown_movies = encoded(latest_per_pair(live.training), ids)
    replaced = pair_keys(rated.user, rated.movie)
    splits, superseded = {}, 0
    for part in SPLITS:
        split = getattr(data.splits, part)
        kept = ~np.isin(pair_keys(split.user, split.movie), replaced)
        superseded += int((~kept).sum())
        splits[part] = split.take(kept)
    splits["train"] = Ratings.concat(splits["train"], rated)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
    try:
        staged.chmod(0o755)
        for part in SPLITS:
            write_ratings(splits[part], staged / f"{part}.parquet")
        write_users(ids, staged)
        shutil.copyfile(base / "movies.parquet", staged / "movies.parquet")
        everything = Ratings.concat(*(splits[p] for p in SPLITS))
        bounds = np.cumsum([0] + [len(splits[p]) for p in SPLITS])
        rows = {p: np.arange(bounds[i], bounds[i + 1]) for i, p in enumerate(SPLITS)}
        write_json(staged / STATS, statistics(manifest["dataset"], ids, pd.DataFrame(data.movies), everything, rows))
        manifest = manifest | {
            "build": uuid.uuid4().hex,
            "sizes": {p: len(splits[p]) for p in SPLITS},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            LIVE: live.record() | {"trained_ratings": len(rated), "unknown_movies": unknown_movies,
                                   "new_users": len(ids.user_ids) - data.n_users,
                                   "superseded_dataset_ratings": superseded, "base_build": manifest["build"]},
        }
        write_json(staged / MANIFEST, manifest)  # last: a folder without its manifest is never valid
        install(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return manifest
