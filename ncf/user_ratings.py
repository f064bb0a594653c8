"""Users' ratings as the input of a ranking: `Profiles` (one row of ratings per user, a user the model never saw
included) and `SeenItems` (each user's rated movies, which a ranking leaves out). The ranking itself is
`ncf.ranking`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ncf.data import Ratings

NEW_USER = -1  # a profile's user index when the model has no embedding for its user


def row_positions(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The positions of `rows`' entries in a CSR with row pointer `indptr`, row after row (no Python loop)."""
    starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
    if not len(lengths):
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(lengths.sum(), dtype=np.int64) + np.repeat(starts - offsets, lengths)


class SeenItems:
    """Each user's already-rated movie indices in CSR form (row pointer + indices)."""

    def __init__(self, users: np.ndarray, movies: np.ndarray, n_users: int):
        order = np.argsort(users, kind="stable")
        self.indices = np.asarray(movies)[order].astype(np.int64)
        self.indptr = np.searchsorted(np.asarray(users)[order], np.arange(n_users + 1))

    def of(self, user: int) -> np.ndarray:
        return self.indices[self.indptr[user]: self.indptr[user + 1]]

    def counts(self) -> np.ndarray:
        """How many movies each user has."""
        return np.diff(self.indptr)

    def mask_rows(self, scores: torch.Tensor, users: np.ndarray) -> None:
        """Set the seen entries of each row of `scores` to -inf, in place."""
        users = np.asarray(users, dtype=np.int64)
        rows = np.repeat(np.arange(len(users)), self.indptr[users + 1] - self.indptr[users])
        cols = self.indices[row_positions(self.indptr, users)]
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = float("-inf")


@dataclass(frozen=True)
class Profiles:
    """Users' ratings, the input of every ranking (`ncf.ranking.rank_profiles`), one row per user: row i's
    ratings are `ratings.take(slice(indptr[i], indptr[i + 1]))` (`ratings.user` holds the row), and `users[i]` is
    the model's index of its user, `NEW_USER` where the model has no embedding for it (a user it never saw).

    A profile is what a ranking reads of a user: the retriever's profile and the sequence signal are built from
    its ratings, and its own movies are never recommended. Build one with `of_ratings` (every user of some
    ratings, by index) and `take` (some of them), or `one` (a single user's ratings)."""

    ratings: Ratings
    indptr: np.ndarray
    users: np.ndarray

    @classmethod
    def of_ratings(cls, ratings: Ratings, n_users: int) -> Profiles:
        """The profiles of users 0..n_users-1 (row u: user u) from encoded `ratings`."""
        order = np.argsort(ratings.user, kind="stable")
        grouped = ratings.take(order)
        return cls(grouped, np.searchsorted(grouped.user, np.arange(n_users + 1)), np.arange(n_users, dtype=np.int64))

    @classmethod
    def one(cls, movies, ratings, timestamps=None, user: int = NEW_USER) -> Profiles:
        """One user's profile from movie indices and their ratings; without `timestamps` the ratings are taken
        as given oldest first."""
        movies = np.asarray(movies, dtype=np.int64)
        timestamps = np.arange(len(movies)) if timestamps is None else timestamps
        rated = Ratings(np.zeros(len(movies), dtype=np.int64), movies, np.asarray(ratings, dtype=np.float64),
                        np.asarray(timestamps, dtype=np.int64))
        return cls(rated, np.asarray([0, len(movies)]), np.asarray([user], dtype=np.int64))

    @classmethod
    def of_seen(cls, seen: SeenItems, users: np.ndarray) -> Profiles:
        """Known `users`' profiles from their movies alone (ratings NaN, timestamps 0): enough where nothing reads
        the ratings (the model alone, which ranks by who the user is and leaves their movies out)."""
        users = np.asarray(users, dtype=np.int64)
        lengths = seen.indptr[users + 1] - seen.indptr[users]
        n = int(lengths.sum())
        rated = Ratings(np.repeat(np.arange(len(users)), lengths), seen.indices[row_positions(seen.indptr, users)],
                        np.full(n, np.nan), np.zeros(n, dtype=np.int64))
        return cls(rated, np.r_[0, np.cumsum(lengths)], users)

    def __len__(self) -> int:
        return len(self.users)

    def take(self, rows: np.ndarray) -> Profiles:
        """The profiles of `rows`, in that order (gathered without a Python loop)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.indptr[rows + 1] - self.indptr[rows]
        picked = self.ratings.take(row_positions(self.indptr, rows))
        renumbered = Ratings(np.repeat(np.arange(len(rows)), lengths), picked.movie, picked.rating, picked.timestamp)
        return Profiles(renumbered, np.r_[0, np.cumsum(lengths)], self.users[rows])

    def of(self, row: int) -> Ratings:
        """Row `row`'s ratings."""
        return self.ratings.take(slice(self.indptr[row], self.indptr[row + 1]))

    def latest(self, n: int) -> Profiles:
        """Each row's `n` most recent ratings (by timestamp; equal times in the order given), oldest first."""
        counts = self.counts()
        if counts.max(initial=0) <= n:
            return self
        rated = self.ratings
        by_time = rated.take(np.lexsort((np.arange(len(rated)), rated.timestamp, rated.user)))
        from_the_end = np.repeat(self.indptr[1:], counts) - 1 - np.arange(len(rated))
        return Profiles(by_time.take(from_the_end < n), np.r_[0, np.cumsum(np.minimum(counts, n))], self.users)

    def counts(self) -> np.ndarray:
        """How many ratings each profile has."""
        return np.diff(self.indptr)

    def seen(self) -> SeenItems:
        """Each row's own movies: what a ranking of these profiles leaves out."""
        return SeenItems(self.ratings.user, self.ratings.movie, len(self))

    def known(self) -> np.ndarray:
        """Mask of the rows whose user the model has an embedding for."""
        return self.users != NEW_USER
