"""Implicit-feedback matrix factorisation (ALS), fitted by the `implicit` library, scored with numpy alone."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from pydantic import Field
from threadpoolctl import threadpool_limits

from ncf.retrievers.base import Retriever, RetrieverSettings, strongest_first


class ALSSettings(RetrieverSettings):
    """`retrieval.als`: the factors, their L2 penalty and the alternating passes of the fit."""

    factors: int = Field(gt=0)
    regularization: float = Field(ge=0)
    iterations: int = Field(gt=0)


class ALS(Retriever):
    """Implicit-feedback matrix factorisation (Hu, Koren, Volinsky 2008), fitted by `implicit`.

    Only the item factors Y are kept: a profile's user factors are solved for against them, exactly as
    `implicit`'s `recalculate_user` does, x = (Y'Y + Y'(C - I)Y + regularization I)^-1 Y'C p with confidence
    C = alpha x the profile's entries; so a profile the fit never saw is scored like a fitted one. Deterministic
    for a given `seed` (it seeds the initial factors; the conjugate-gradient solves are per row, so the thread
    count does not change the result). `implicit` is imported only by `fit`.
    """

    name = "als"
    Settings = ALSSettings
    weighs_profiles = False  # confidences are the plain 0/1 interactions the factors were fitted on

    def __init__(self, factors: int = 64, regularization: float = 10.0, alpha: float = 1.0, iterations: int = 15,
                 seed: int = 0, num_threads: int = 1):
        self.factors, self.regularization, self.alpha = factors, float(regularization), float(alpha)
        self.iterations, self.seed, self.num_threads = iterations, seed, num_threads
        self.item_factors: np.ndarray | None = None

    @classmethod
    def from_settings(cls, settings: ALSSettings, seed: int = 0) -> ALS:
        return cls(settings.factors, settings.regularization, iterations=settings.iterations, seed=seed,
                   num_threads=1)

    def fit(self, interactions: sp.csr_matrix) -> ALS:
        """Fit with BLAS limited to one thread: `implicit` runs its own threads (`num_threads`,
        0 = every core) and warns, and slows down, when OpenBLAS runs a thread pool under them."""
        from implicit.cpu.als import AlternatingLeastSquares

        with threadpool_limits(limits=1, user_api="blas"):
            model = AlternatingLeastSquares(factors=self.factors, regularization=self.regularization,
                                            alpha=self.alpha, iterations=self.iterations, dtype=np.float32,
                                            num_threads=self.num_threads, random_state=self.seed)
            model.fit(sp.csr_matrix(interactions, dtype=np.float32), show_progress=False)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)
        return self

    def user_factors(self, profiles: sp.csr_matrix) -> np.ndarray:
        """Each profile row's least-squares user factors against the fixed item factors (float64)."""
        profiles = sp.csr_matrix(profiles, dtype=np.float64)
        y = self.item_factors.astype(np.float64)
        shared = y.T @ y + self.regularization * np.eye(y.shape[1])
        confidence = profiles.multiply(self.alpha).tocsr()
        rhs = np.asarray(confidence @ y)
        x = np.linalg.solve(shared, rhs.T).T  # right for every row whose confidences are all 1
        for row in range(confidence.shape[0]):
            start, end = confidence.indptr[row], confidence.indptr[row + 1]
            extra = confidence.data[start:end] - 1.0
            if np.any(extra):
                items = y[confidence.indices[start:end]]
                x[row] = np.linalg.solve(shared + (items * extra[:, None]).T @ items, rhs[row])
        return x

    def score(self, profiles: sp.csr_matrix) -> np.ndarray:
        return (self.user_factors(profiles) @ self.item_factors.T.astype(np.float64)).astype(np.float32)

    def evidence(self, profile: sp.csr_matrix, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """The cosine of each profile movie's item factors with `movie`'s: ALS scores have no per-movie terms."""
        movies = sp.csr_matrix(profile).indices
        vectors = self.item_factors[np.r_[movies, movie]]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return strongest_first(movies, vectors[:-1] @ vectors[-1], movie)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"settings": np.asarray([self.factors, self.iterations, self.seed, self.num_threads], dtype=np.int64),
                "floats": np.asarray([self.regularization, self.alpha]), "item_factors": self.item_factors}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ALS:
        """(Files saved before profiles were an input also hold the fitted users' factors: not read.)"""
        factors, iterations, seed, num_threads = (int(v) for v in arrays["settings"])
        regularization, alpha = (float(v) for v in arrays["floats"])
        model = cls(factors, regularization, alpha, iterations, seed, num_threads)
        model.item_factors = arrays["item_factors"]
        return model
