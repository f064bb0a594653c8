"""Top-k over the movies a user has not rated: shared by evaluation and serving."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# Scores a batch of user indices against the whole catalogue: [len(users), n_movies].
ScoreFn = Callable[[np.ndarray], np.ndarray | torch.Tensor]


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
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts
        rows = np.repeat(np.arange(len(users)), lengths)
        cols = self.indices[np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])] \
            if len(users) else np.empty(0, dtype=np.int64)
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = float("-inf")


def top_k_unseen(score: ScoreFn, users: np.ndarray, seen: SeenItems, k: int, chunk: int = 16) -> tuple[
        np.ndarray, np.ndarray]:
    """Indices and scores of each user's k best movies not yet rated, in order."""
    items, values = [], []
    for start in range(0, len(users), chunk):
        batch = np.asarray(users[start: start + chunk])
        raw = score(batch)
        scores = raw.float().clone() if isinstance(raw, torch.Tensor) else torch.tensor(raw, dtype=torch.float32)
        seen.mask_rows(scores, batch)
        top = torch.topk(scores, k=min(k, scores.shape[1]), dim=1)
        items.append(top.indices.numpy())
        values.append(top.values.numpy())
    return np.concatenate(items), np.concatenate(values)
