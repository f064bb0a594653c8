"""Where a rank's training batches come from, epoch by epoch, and the unrated movies drawn beside them
(the implicit and joint objectives)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import torch

from ncf.config import Config
from ncf.data import MovieLens, Ratings
from ncf.training.reporting import Reporter
from ncf.training.state import Phase

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # user indices, movie indices, ratings


class BatchSource(Protocol):
    """Where a rank's training batches come from, epoch by epoch: the same number of batches on every rank
    (DDP steps together). `InMemoryBatches` by default; Ray Data shards under `data.loader: ray_data`
    (`ncf.integrations.ray_data`)."""

    def epoch(self, phase: Phase, epoch: int) -> Iterable[Batch]:
        """This rank's batches of one epoch of `phase` (search: train; refit: train + validation)."""

    def figures(self) -> dict[str, float]:
        """Metrics about the epoch last iterated, added to that epoch's metrics."""


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


class InMemoryBatches:
    """Batches sliced from the in-memory splits (`epoch_batches`): every rank draws the same seeded
    permutation of the epoch and takes every `world_size`-th rating."""

    def __init__(self, config: Config, data: MovieLens, reporter: Reporter):
        self.splits, self.cfg = data.splits, config.train
        self.rank, self.world_size = reporter.rank, reporter.world_size
        self._refit: tuple[torch.Tensor, ...] | None = None

    def epoch(self, phase: Phase, epoch: int) -> Iterable[Batch]:
        if phase == Phase.SEARCH:
            tensors = self.splits.train.tensors()
        else:
            self._refit = self._refit or self.splits.train_and_validation().tensors()  # built once, when refitting
            tensors = self._refit
        return epoch_batches(tensors, self.cfg.batch_size, epoch=epoch, seed=self.cfg.seed, rank=self.rank,
                             world_size=self.world_size)

    def figures(self) -> dict[str, float]:
        return {}


# ----------------------------------------------------------------------------- negative sampling


def rated_keys(ratings: Ratings, n_movies: int) -> np.ndarray:
    """The sorted user * n_movies + movie of every rated pair: what `sample_unrated` draws against."""
    return np.unique(ratings.user.astype(np.int64) * n_movies + ratings.movie)


def sample_unrated(users: np.ndarray, rated_keys: np.ndarray, n_movies: int, n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """`n` movies per entry of `users` drawn uniformly from those the user has not rated: [len(users) * n].

    `rated_keys` is the sorted array of user * n_movies + movie of every rated pair. Vectorised
    rejection: draw all, redraw only the rated ones, until none is left.
    """
    users = np.repeat(np.asarray(users, dtype=np.int64), n)
    movies = rng.integers(0, n_movies, size=len(users))
    todo = np.arange(len(users))
    while len(todo):
        keys = users[todo] * n_movies + movies[todo]
        position = np.minimum(np.searchsorted(rated_keys, keys), len(rated_keys) - 1)
        rated = rated_keys[position] == keys if len(rated_keys) else np.zeros(len(todo), bool)
        todo = todo[rated]
        movies[todo] = rng.integers(0, n_movies, size=len(todo))
    return movies
