"""Candidate retrieval for full-catalogue ranking: EASE and ALS, and the blend with the NCF's signals.

The NCF model regresses ratings, which ranks the catalogue below popularity; an item-item
(EASE) or implicit-feedback factor (ALS) retriever trained on who-rated-what ranks far
better. The recommender then re-ranks each user's top-N unseen retrieved movies by a blend
of the standardised retriever score and the NCF's (`ncf.reranking`).

A pure computing library (numpy, scipy, `implicit` to fit ALS): no Ray, no MLflow. Fitted
retrievers save to a single .npz of plain arrays, so a registered model can ship one
without pickling library objects, and loading or scoring needs only numpy and scipy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from ncf.config import RetrievalConfig
from ncf.data import Ratings

FILE_NAME = "retriever.npz"

# ----------------------------------------------------------------------------- interactions


def recency_age(users: np.ndarray, timestamps: np.ndarray, unit: Literal["rank", "days"] = "rank") -> np.ndarray:
    """Age of each rating within its user's history: 0 for the newest.

    "rank": how many of the user's ratings are strictly newer (ties share an age, so the
    many ratings a user enters in the same second weigh the same); "days": days before
    the user's newest rating.
    """
    users = np.asarray(users)
    timestamps = np.asarray(timestamps, dtype=np.int64)
    if unit == "days":
        newest = np.full(users.max() + 1 if len(users) else 0, np.iinfo(np.int64).min)
        np.maximum.at(newest, users, timestamps)
        return (newest[users] - timestamps) / 86_400.0
    if unit != "rank":
        raise ValueError(f"unknown recency unit '{unit}' (rank or days)")
    order = np.lexsort((-timestamps, users))  # by user, newest first
    su, st = users[order], timestamps[order]
    position = np.arange(len(order))
    user_start = np.searchsorted(su, su, side="left")
    new_group = np.r_[True, (su[1:] != su[:-1]) | (st[1:] != st[:-1])] if len(order) else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(new_group, position, 0))
    age = np.empty(len(order), dtype=np.float64)
    age[order] = group_start - user_start
    return age


def interaction_matrix(ratings: Ratings, n_users: int, n_movies: int, min_rating: float | None = None,
                       recency_half_life: float | None = None,
                       recency_unit: Literal["rank", "days"] = "rank",
                       rating_offset: float | None = None) -> sp.csr_matrix:
    """User x movie float32 CSR of who rated what: 1 per rating, or only ratings >= `min_rating`.

    With `recency_half_life`, each entry weighs 0.5 ** (age / half_life), age measured by
    `recency_age` among the kept ratings: a user's profile leans on what they liked lately.
    The default unit, "rank", is the one that measured best on the validation slice
    (docs/benchmarks/retrieval.md): with EASE on all ratings, NDCG@10 0.104 against 0.094
    by days; on ratings >= 4 the two tie (0.1117 and 0.1119). Users rate in bursts, often
    years apart: a rank counts the ratings since, not the calendar gap.

    With `rating_offset`, each entry is also multiplied by rating - rating_offset: a profile
    leans on the movies the user liked most.
    """
    keep = np.ones(len(ratings), dtype=bool) if min_rating is None else ratings.rating >= min_rating
    users, movies = ratings.user[keep], ratings.movie[keep]
    weights = np.ones(len(users), dtype=np.float64)
    if recency_half_life is not None:
        if recency_half_life <= 0:
            raise ValueError("recency_half_life must be positive")
        weights = 0.5 ** (recency_age(users, ratings.timestamp[keep], recency_unit) / recency_half_life)
    if rating_offset is not None:
        graded = ratings.rating[keep] - rating_offset
        if (graded <= 0).any():
            raise ValueError(f"rating_offset {rating_offset} leaves kept ratings with a weight <= 0")
        weights = weights * graded
    matrix = sp.csr_matrix((weights.astype(np.float32), (users, movies)), shape=(n_users, n_movies),
                           dtype=np.float32)
    matrix.sum_duplicates()
    return matrix


# ----------------------------------------------------------------------------- what users rate next


class Sequence:
    """What users rate next, from the order of everyone's ratings: a signal the retriever's scores are blended
    with (`retrieval.sequence_weight`), for users whose next ratings follow their latest ones (as every held-out
    rating does on a per-user temporal split).

    `transitions[i, j]` counts how often movie j comes within `window` ratings after movie i in a user's history,
    ordered by time; its row divided by the square root of the row's total, so that movies followed by everything
    do not drown the rest. Ratings a user made in the same second have no order: such a pair counts both ways
    (which of them fall within the window follows a fixed pseudo-random order of the movies, never their ids,
    which a split's own tie order may follow). A user's score of movie j is log(1 + sum over i of
    decay ** age_i x transitions[i, j]) over the user's ratings i with fewer than `last` newer ones (age_i: how
    many are newer; `recency_age`). Every rating counts, whatever its value: what users watch next, not only what
    they liked. Built from the ratings (never saved): memory grows with the distinct (movie, next movie) pairs, at
    most 2 x `window` per rating.
    """

    TIE_ORDER_SEED = 0

    def __init__(self, window: int = 10, last: int = 10, decay: float = 0.7):
        if window < 1 or last < 1 or not 0 < decay <= 1:
            raise ValueError(f"sequence window ({window}) and last ({last}) must be >= 1 and decay ({decay}) in (0, 1]")
        self.window, self.last, self.decay = window, last, decay

    def fit(self, ratings: Ratings, n_users: int, n_movies: int) -> Sequence:
        tie_order = np.random.default_rng(self.TIE_ORDER_SEED).permutation(n_movies)
        order = np.lexsort((tie_order[ratings.movie], ratings.timestamp, ratings.user))  # by user, oldest first
        users, movies, times = ratings.user[order], ratings.movie[order], ratings.timestamp[order]
        counts = sp.csr_matrix((n_movies, n_movies), dtype=np.float32)
        for gap in range(1, self.window + 1):  # one gap at a time: the peak is one gap's pairs, not all of them
            same_user = users[gap:] == users[:-gap]
            before, after = movies[:-gap][same_user], movies[gap:][same_user]
            tied = times[:-gap][same_user] == times[gap:][same_user]
            counts = counts + sp.csr_matrix((np.ones(len(before) + int(tied.sum()), np.float32),
                                             (np.r_[before, after[tied]], np.r_[after, before[tied]])),
                                            shape=(n_movies, n_movies), dtype=np.float32)
        totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        self.transitions = sp.csr_matrix(sp.diags(1 / np.sqrt(np.maximum(totals, 1))) @ counts, dtype=np.float32)
        age = recency_age(ratings.user, ratings.timestamp, "rank")
        kept = age < self.last
        self.recent = sp.csr_matrix((self.decay ** age[kept], (ratings.user[kept], ratings.movie[kept])),
                                    shape=(n_users, n_movies), dtype=np.float32)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        """[len(users), n_movies] float32."""
        return np.log1p((self.recent[np.asarray(users)] @ self.transitions).toarray())

    def evidence(self, user: int, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """The user's recent movies that `movie` follows in others' histories, strongest first, with their terms of
        its score (before the log): recency weight x transitions[recent movie, movie]."""
        row = self.recent[user]
        return strongest_first(row.indices, row.data * self.transitions[row.indices, movie].toarray().ravel(), movie)


def strongest_first(movies: np.ndarray, shares: np.ndarray, movie: int) -> tuple[np.ndarray, np.ndarray]:
    """The evidence for `movie` among `movies` with their `shares` of its score: those with a positive share, the
    movie itself left out, largest share first."""
    keep = (shares > 0) & (movies != movie)
    order = np.argsort(-shares[keep], kind="stable")
    return movies[keep][order].astype(np.int64), shares[keep][order].astype(np.float64)


# ----------------------------------------------------------------------------- retrievers


@runtime_checkable
class Retriever(Protocol):
    """What training and serving hold: fit on a user x movie CSR, score users over the catalogue."""

    name: str

    def fit(self, interactions: sp.csr_matrix) -> Retriever: ...

    def score(self, users: np.ndarray) -> np.ndarray: ...

    def save(self, folder: Path) -> Path: ...


def _csr_arrays(prefix: str, matrix: sp.csr_matrix) -> dict[str, np.ndarray]:
    return {f"{prefix}_data": matrix.data, f"{prefix}_indices": matrix.indices, f"{prefix}_indptr": matrix.indptr,
            f"{prefix}_shape": np.asarray(matrix.shape, dtype=np.int64)}


def _csr_from(prefix: str, arrays: dict[str, np.ndarray]) -> sp.csr_matrix:
    return sp.csr_matrix((arrays[f"{prefix}_data"], arrays[f"{prefix}_indices"], arrays[f"{prefix}_indptr"]),
                         shape=tuple(arrays[f"{prefix}_shape"]))


def _write(folder: Path, kind: str, arrays: dict[str, np.ndarray]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE_NAME
    np.savez(path, kind=np.asarray(kind), **arrays)
    return path


def _read(folder: Path) -> tuple[str, dict[str, np.ndarray]]:
    with np.load(Path(folder) / FILE_NAME, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return str(arrays.pop("kind")), arrays


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


class EASE:
    """Steck's EASE (2019): closed-form item-item weights B = I - P / diag(P), P = (X'X + lambda I)^-1.

    B is dense n_items^2, so only the `max_items` most-interacted movies take part
    (`None`: every movie with an interaction); the rest score -inf and are never retrieved.
    float32 throughout: 4 bytes x max_items^2 for B, little more at the peak of `fit`.
    `num_threads` caps BLAS during the fit (None: as configured); on a busy machine one
    thread is faster than a thread pool fighting other processes for the cores.
    """

    name = "ease"

    def __init__(self, lam: float = 250.0, max_items: int | None = 8000, num_threads: int | None = None):
        if lam <= 0:
            raise ValueError("lam must be positive")
        self.lam, self.max_items, self.num_threads = float(lam), max_items, num_threads
        self.items: np.ndarray | None = None  # kept movie indices, ascending
        self.weights: np.ndarray | None = None  # B over the kept movies, float32
        self.profiles: sp.csr_matrix | None = None

    def fit(self, interactions: sp.csr_matrix, profiles: sp.csr_matrix | None = None) -> EASE:
        """Fit B on `interactions`; users are scored from `profiles` (default: the same matrix).

        A recency-weighted profile (see `interaction_matrix`) with B fitted on the plain
        matrix is the split that measures best: recency sharpens whom the user is now,
        while B keeps every co-occurrence. Peak memory about one n_kept^2 float32 matrix:
        X'X is built in place column block by column block, then inverted in place.
        """
        gram = self.gram(interactions)
        return self.fit_gram(gram, interactions if profiles is None else profiles, overwrite=True)

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

    def fit_gram(self, gram: tuple[np.ndarray, np.ndarray], profiles: sp.csr_matrix, overwrite: bool = False) -> EASE:
        """B from a precomputed `gram`; `overwrite` lets the fit reuse the Gram matrix's memory."""
        items, g = gram
        p = g if overwrite else g.copy()
        p[np.diag_indices_from(p)] += np.float32(self.lam)
        with threadpool_limits(limits=self.num_threads, user_api="blas"):
            p = _spd_inverse_in_place(p)
        p /= -np.diag(p).copy()[None, :]  # B = I - P / diag(P), column by column
        p[np.diag_indices_from(p)] = 0.0
        self.items, self.weights = items, np.ascontiguousarray(p, dtype=np.float32)
        self.profiles = sp.csr_matrix(profiles, dtype=np.float32)
        return self

    @property
    def n_movies(self) -> int:
        return self.profiles.shape[1]

    def score_profiles(self, profiles: sp.csr_matrix) -> np.ndarray:
        """Scores of arbitrary profile rows (e.g. a user's current ratings at serving time)."""
        kept = sp.csr_matrix(profiles, dtype=np.float32)[:, self.items]
        out = np.full((kept.shape[0], self.n_movies), -np.inf, dtype=np.float32)
        out[:, self.items] = kept @ self.weights
        return out

    def score(self, users: np.ndarray) -> np.ndarray:
        return self.score_profiles(self.profiles[np.asarray(users)])

    def item_matrix_bytes(self) -> int:
        return int(self.weights.nbytes)

    def save(self, folder: Path) -> Path:
        return _write(folder, self.name, {"lam": np.asarray(self.lam), "max_items": np.asarray(self.max_items or -1),
                                          "items": self.items, "weights": self.weights,
                                          **_csr_arrays("profiles", self.profiles)})

    @classmethod
    def load(cls, folder: Path) -> EASE:
        kind, arrays = _read(folder)
        if kind != cls.name:
            raise ValueError(f"{Path(folder) / FILE_NAME} holds a '{kind}' retriever, not '{cls.name}'")
        max_items = int(arrays["max_items"])
        model = cls(float(arrays["lam"]), None if max_items < 0 else max_items)
        model.items, model.weights = arrays["items"], arrays["weights"]
        model.profiles = _csr_from("profiles", arrays)
        return model


class ALS:
    """Implicit-feedback matrix factorisation (Hu, Koren, Volinsky 2008), fitted by `implicit`.

    Deterministic for a given `seed` (it seeds the initial factors; the conjugate-gradient
    solves are per row, so the thread count does not change the result). `implicit` is
    imported only by `fit`: a saved model scores with numpy alone.
    """

    name = "als"

    def __init__(self, factors: int = 64, regularization: float = 10.0, alpha: float = 1.0, iterations: int = 15,
                 seed: int = 0, num_threads: int = 1):
        self.factors, self.regularization, self.alpha = factors, float(regularization), float(alpha)
        self.iterations, self.seed, self.num_threads = iterations, seed, num_threads
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None

    def fit(self, interactions: sp.csr_matrix) -> ALS:
        """Fit with BLAS limited to one thread: `implicit` runs its own threads (`num_threads`,
        0 = every core) and warns, and slows down, when OpenBLAS runs a thread pool under them."""
        from implicit.cpu.als import AlternatingLeastSquares

        with threadpool_limits(limits=1, user_api="blas"):
            model = AlternatingLeastSquares(factors=self.factors, regularization=self.regularization,
                                            alpha=self.alpha, iterations=self.iterations, dtype=np.float32,
                                            num_threads=self.num_threads, random_state=self.seed)
            model.fit(sp.csr_matrix(interactions, dtype=np.float32), show_progress=False)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return self.user_factors[np.asarray(users)] @ self.item_factors.T

    def save(self, folder: Path) -> Path:
        settings = np.asarray([self.factors, self.iterations, self.seed, self.num_threads], dtype=np.int64)
        return _write(folder, self.name, {"settings": settings,
                                          "floats": np.asarray([self.regularization, self.alpha]),
                                          "user_factors": self.user_factors, "item_factors": self.item_factors})

    @classmethod
    def load(cls, folder: Path) -> ALS:
        kind, arrays = _read(folder)
        if kind != cls.name:
            raise ValueError(f"{Path(folder) / FILE_NAME} holds a '{kind}' retriever, not '{cls.name}'")
        factors, iterations, seed, num_threads = (int(v) for v in arrays["settings"])
        regularization, alpha = (float(v) for v in arrays["floats"])
        model = cls(factors, regularization, alpha, iterations, seed, num_threads)
        model.user_factors, model.item_factors = arrays["user_factors"], arrays["item_factors"]
        return model


RETRIEVERS: dict[str, type[EASE] | type[ALS]] = {EASE.name: EASE, ALS.name: ALS}


def configured_retriever(kind: Literal["ease", "als"], cfg: RetrievalConfig, seed: int = 0) -> EASE | ALS:
    """An unfitted retriever of `kind` with `cfg`'s settings (one BLAS / `implicit` thread)."""
    if kind == EASE.name:
        return EASE(cfg.ease_lambda, cfg.ease_max_items, num_threads=1)
    return ALS(cfg.als_factors, cfg.als_regularization, iterations=cfg.als_iterations, seed=seed, num_threads=1)


def fit_on_ratings(retriever: EASE | ALS, ratings: Ratings, n_users: int, n_movies: int,
                   cfg: RetrievalConfig) -> EASE | ALS:
    """Fit on the ratings >= `cfg.min_rating`. EASE scores users from a profile weighted by recency and by
    rating when `cfg` asks for it (its item weights are still fitted on the plain interactions)."""
    interactions = interaction_matrix(ratings, n_users, n_movies, cfg.min_rating)
    if not isinstance(retriever, EASE):
        return retriever.fit(interactions)
    weighted = cfg.recency_half_life is not None or cfg.profile_rating_offset is not None
    profiles = (interaction_matrix(ratings, n_users, n_movies, cfg.min_rating, cfg.recency_half_life,
                                   cfg.recency_unit, cfg.profile_rating_offset) if weighted else None)
    return retriever.fit(interactions, profiles)


def load_retriever(folder: Path) -> EASE | ALS:
    """Whichever retriever `save` wrote into `folder`."""
    kind, _ = _read(folder)
    if kind not in RETRIEVERS:
        raise ValueError(f"{Path(folder) / FILE_NAME} holds an unknown retriever '{kind}'")
    return RETRIEVERS[kind].load(folder)


# ----------------------------------------------------------------------------- blend and re-rank


def _standardise(scores: np.ndarray) -> np.ndarray:
    """Row-wise z-scores over the finite entries; a row without spread becomes 0, -inf stays -inf."""
    finite = np.isfinite(scores)
    count = finite.sum(axis=1, keepdims=True)
    values = np.where(finite, scores, 0.0)
    mean = values.sum(axis=1, keepdims=True) / np.maximum(count, 1)
    centred = np.where(finite, values - mean, 0.0)
    std = np.sqrt((centred**2).sum(axis=1, keepdims=True) / np.maximum(count, 1))
    z = np.divide(centred, std, out=np.zeros_like(centred), where=std > 1e-12)
    return np.where(finite, z, -np.inf)


def blend(retriever_scores: np.ndarray, signals: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """z(retriever) + sum over signals of weight * z(signal), each z-scored over the user's own candidates (rows).

    Standardising makes a weight mean the same for every user and every pair of models
    whatever their score scales. A candidate the retriever could not score (-inf) stays
    last and takes no part in any mean or spread; a row without spread scores 0. A signal
    without a weight counts 0.
    """
    r = _standardise(np.asarray(retriever_scores, dtype=np.float64))
    out = r.copy()
    for name, scores in signals.items():
        weight = weights.get(name, 0.0)
        if weight:
            z = _standardise(np.where(np.isfinite(r), np.asarray(scores, dtype=np.float64), -np.inf))
            out += weight * np.where(np.isfinite(z), z, 0.0)
    return np.where(np.isfinite(r), out, -np.inf)
