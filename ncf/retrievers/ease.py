"""EASE (Steck 2019): closed-form item-item weights, the retriever the deck and recommender presets serve."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from pydantic import Field
from threadpoolctl import threadpool_limits

from ncf.retrievers.base import Retriever, RetrieverSettings, strongest_first


class EASESettings(RetrieverSettings):
    """`retrieval.ease`: the L2 penalty (the paper's lambda) and how many of the most rated movies take part."""

    regularization: float = Field(gt=0)
    max_items: int | None = Field(gt=0)


def _spd_inverse_in_place(a: np.ndarray, block: int = 512) -> np.ndarray:
    """Inverse of a symmetric positive definite C-ordered matrix, in its own memory (Cholesky: half
    the flops of LU). Its transpose is the Fortran-ordered view LAPACK wants: the same matrix."""
    factor, info = scipy.linalg.lapack.spotrf(a.T, lower=False, clean=False, overwrite_a=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"X'X + lambda I is not positive definite (LAPACK spotrf info {info})")
    inverse, info = scipy.linalg.lapack.spotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"X'X + lambda I cannot be inverted (LAPACK spotri info {info})")
    n = inverse.shape[0]
    for start in range(0, n, block):  # spotri fills the upper triangle: mirror it, block by block
        end = min(start + block, n)
        diagonal = inverse[start:end, start:end]
        diagonal[...] = np.triu(diagonal) + np.triu(diagonal, 1).T
        inverse[end:, start:end] = inverse[start:end, end:].T
    return inverse.T


class EASE(Retriever):
    """Steck's EASE (2019): item-item weights B = I - P / diag(P), P = (X'X + lambda I)^-1; a profile p scores
    p @ B.

    B is dense n_items^2, so only the `max_items` most-interacted movies take part
    (`None`: every movie with an interaction); the rest score -inf and are never retrieved.
    float32 throughout: 4 bytes x max_items^2 for B, little more at the peak of `fit`.
    `num_threads` caps BLAS during the fit (None: as configured); on a busy machine one
    thread is faster than a thread pool fighting other processes for the cores.
    Profiles weighted by recency and rating with B fitted on the plain interactions is the split that measures
    best (docs/benchmarks/retrieval.md): recency sharpens whom the user is now, while B keeps every co-occurrence.
    """

    name = "ease"
    Settings = EASESettings
    weighs_profiles = True

    def __init__(self, lam: float = 250.0, max_items: int | None = 8000, num_threads: int | None = None):
        if lam <= 0:
            raise ValueError("lam must be positive")
        self.lam, self.max_items, self.num_threads = float(lam), max_items, num_threads
        self.items: np.ndarray | None = None  # kept movie indices, ascending
        self.weights: np.ndarray | None = None  # B over the kept movies, float32

    @classmethod
    def from_settings(cls, settings: EASESettings, seed: int = 0) -> EASE:
        return cls(settings.regularization, settings.max_items, num_threads=1)

    def fit(self, interactions: sp.csr_matrix) -> EASE:
        """Peak memory about one n_kept^2 float32 matrix: X'X is built in place column block by column block,
        then inverted in place."""
        return self.fit_gram(self.gram(interactions), overwrite=True)

    def gram(self, interactions: sp.csr_matrix, block_elements: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
        """Kept movie indices and X'X over them: the part of the fit independent of lambda (reused by sweeps)."""
        interactions = sp.csr_matrix(interactions, dtype=np.float32)
        counts = interactions.getnnz(axis=0)
        rated = np.flatnonzero(counts > 0)
        if self.max_items is not None and len(rated) > self.max_items:
            rated = rated[np.argsort(-counts[rated], kind="stable")[: self.max_items]]
        items = np.sort(rated)
        x = interactions[:, items].tocsc()
        xt = x.T.tocsr()
        g = np.empty((len(items), len(items)), dtype=np.float32)
        width = int(np.clip(block_elements // max(x.shape[0], len(items), 1), 1, max(len(items), 1)))
        for start in range(0, len(items), width):  # sparse x dense blocks: neither dense X nor sparse X'X
            g[:, start: start + width] = xt @ x[:, start: start + width].toarray()
        return items, g

    def fit_gram(self, gram: tuple[np.ndarray, np.ndarray], overwrite: bool = False) -> EASE:
        """B from a precomputed `gram`; `overwrite` lets the fit reuse the Gram matrix's memory."""
        items, g = gram
        p = g if overwrite else g.copy()
        p[np.diag_indices_from(p)] += np.float32(self.lam)
        with threadpool_limits(limits=self.num_threads, user_api="blas"):
            p = _spd_inverse_in_place(p)
        p /= -np.diag(p).copy()[None, :]  # B = I - P / diag(P), column by column
        p[np.diag_indices_from(p)] = 0.0
        self.items, self.weights = items, np.ascontiguousarray(p, dtype=np.float32)
        return self

    def score(self, profiles: sp.csr_matrix) -> np.ndarray:
        kept = sp.csr_matrix(profiles, dtype=np.float32)[:, self.items]
        out = np.full((kept.shape[0], profiles.shape[1]), -np.inf, dtype=np.float32)
        out[:, self.items] = kept @ self.weights
        return out

    def evidence(self, profile: sp.csr_matrix, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """Exactly the terms of the score: profile weight x B[j, movie] for each kept profile movie j."""
        row = sp.csr_matrix(profile, dtype=np.float32)
        position = np.minimum(np.searchsorted(self.items, np.r_[row.indices, movie]), len(self.items) - 1)
        kept = self.items[position] == np.r_[row.indices, movie]
        if not kept[-1]:
            return np.empty(0, np.int64), np.empty(0)
        shares = row.data[kept[:-1]] * self.weights[position[:-1][kept[:-1]], position[-1]]
        return strongest_first(row.indices[kept[:-1]], shares, movie)

    def item_matrix_bytes(self) -> int:
        return int(self.weights.nbytes)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"lam": np.asarray(self.lam), "max_items": np.asarray(self.max_items or -1), "items": self.items,
                "weights": self.weights}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EASE:
        """(Files saved before profiles were an input also hold the users' profiles: not read.)"""
        max_items = int(arrays["max_items"])
        model = cls(float(arrays["lam"]), None if max_items < 0 else max_items)
        model.items, model.weights = arrays["items"], arrays["weights"]
        return model
