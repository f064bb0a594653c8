"""Item-based k-nearest neighbours on cosine similarity with shrinkage: the standard top-N baseline
(Sarwar et al. 2001; Deshpande and Karypis 2004)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from ncf.retrievers.base import Retriever, RetrieverSettings, csr_arrays, csr_from, terms_of


class ItemKNNSettings(RetrieverSettings):
    """`retrieval.itemknn`: how many neighbours each movie keeps and the shrinkage of the cosine."""

    neighbours: int = Field(gt=0)
    shrink: float = Field(ge=0)


class ItemKNN(Retriever):
    """sim(i, j) = x_i . x_j / (|x_i| |x_j| + shrink) over the columns of the interaction matrix; each movie i
    keeps its `neighbours` most similar movies j (positive similarity only, never itself) as row i of a sparse
    W, and a profile p scores p @ W: the score of j sums, over the profile's movies i that keep j as a
    neighbour, the profile weight of i x sim(i, j). The shrinkage pulls the similarity of movies that few users
    rated towards 0. W holds at most n_movies x neighbours float32 entries; the fit computes the similarities a
    block of movies at a time (`block_elements` floats at once), never the dense n_movies^2 matrix.
    """

    name = "itemknn"
    Settings = ItemKNNSettings
    weighs_profiles = True

    def __init__(self, neighbours: int = 100, shrink: float = 10.0, block_elements: int = 1 << 24):
        if neighbours < 1 or shrink < 0:
            raise ValueError(f"itemknn needs neighbours >= 1 (got {neighbours}) and shrink >= 0 (got {shrink})")
        self.neighbours, self.shrink, self.block_elements = neighbours, float(shrink), block_elements
        self.similar: sp.csr_matrix | None = None  # W: row i holds movie i's neighbours and their similarity

    @classmethod
    def from_settings(cls, settings: ItemKNNSettings, seed: int = 0) -> ItemKNN:
        return cls(settings.neighbours, settings.shrink)

    def fit(self, interactions: sp.csr_matrix) -> ItemKNN:
        x = sp.csc_matrix(interactions, dtype=np.float32)
        n = x.shape[1]
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=0), dtype=np.float32).ravel())
        xt = x.T.tocsr()
        k = min(self.neighbours, max(n - 1, 1))
        width = int(np.clip(self.block_elements // max(n, 1), 1, max(n, 1)))
        rows, cols, values = [], [], []
        for start in range(0, n, width):  # the similarities of a block of movies (columns) to every movie (rows)
            block = np.arange(start, min(start + width, n))
            sim = np.asarray(xt @ x[:, block].toarray(), dtype=np.float32)
            sim /= norms[:, None] * norms[None, block] + np.float32(self.shrink) + np.float32(1e-12)
            sim[block, np.arange(len(block))] = 0.0  # never its own neighbour
            top = np.argpartition(-sim, k - 1, axis=0)[:k] if k < n else np.arange(n)[:, None].repeat(len(block), 1)
            best = np.take_along_axis(sim, top, axis=0)
            keep = best > 0
            rows.append(np.broadcast_to(block[None, :], top.shape)[keep])
            cols.append(top[keep])
            values.append(best[keep])
        self.similar = sp.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                                     shape=(n, n), dtype=np.float32)
        return self

    def score(self, profiles: sp.csr_matrix) -> np.ndarray:
        return np.asarray((sp.csr_matrix(profiles, dtype=np.float32) @ self.similar).toarray(), dtype=np.float32)

    def evidence(self, profile: sp.csr_matrix, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """Exactly the terms of the score: profile weight x sim(i, movie) for each profile movie i keeping it."""
        return terms_of(profile, self.similar, movie)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"neighbours": np.asarray(self.neighbours), "shrink": np.asarray(self.shrink),
                **csr_arrays("similar", self.similar)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ItemKNN:
        model = cls(int(arrays["neighbours"]), float(arrays["shrink"]))
        model.similar = csr_from("similar", arrays)
        return model
