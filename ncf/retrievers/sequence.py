"""What users rate next: a signal blended into a retriever's scores (`retrieval.sequence`)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ncf.data import Ratings
from ncf.retrievers.base import terms_of
from ncf.retrievers.matrices import recency_age


class Sequence:
    """What users rate next, from the order of everyone's ratings: a signal the retriever's scores are blended
    with (`retrieval.sequence.weight`), for users whose next ratings follow their latest ones (as every held-out
    rating does on a per-user temporal split).

    `transitions[i, j]` counts how often movie j comes within `window` ratings after movie i in a user's history,
    ordered by time; its row divided by the square root of the row's total, so that movies followed by everything
    do not drown the rest. Ratings a user made in the same second have no order: such a pair counts both ways
    (which of them fall within the window follows a fixed pseudo-random order of the movies, never their ids,
    which a split's own tie order may follow). A user's recent profile weighs each of the user's ratings with
    fewer than `last` newer ones decay ** age (age: how many are newer; `recency_age`); its score of movie j is
    log(1 + sum over i of recent_i x transitions[i, j]). Every rating counts, whatever its value: what users watch
    next, not only what they liked. Fitted on the ratings (never saved): memory grows with the distinct
    (movie, next movie) pairs, at most 2 x `window` per rating.
    """

    TIE_ORDER_SEED = 0

    def __init__(self, window: int = 10, last: int = 10, decay: float = 0.7):
        if window < 1 or last < 1 or not 0 < decay <= 1:
            raise ValueError(f"sequence window ({window}) and last ({last}) must be >= 1 and decay ({decay}) in (0, 1]")
        self.window, self.last, self.decay = window, last, decay
        self.transitions: sp.csr_matrix | None = None

    def fit(self, ratings: Ratings, n_movies: int) -> Sequence:
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
        return self

    def profiles(self, ratings: Ratings, n_users: int, n_movies: int) -> sp.csr_matrix:
        """Each user's recent profile: decay ** age on the ratings with fewer than `last` newer ones."""
        age = recency_age(ratings.user, ratings.timestamp, "rank")
        kept = age < self.last
        return sp.csr_matrix((self.decay ** age[kept], (ratings.user[kept], ratings.movie[kept])),
                             shape=(n_users, n_movies), dtype=np.float32)

    def score(self, recent: sp.csr_matrix) -> np.ndarray:
        """[recent profile rows, n_movies] float32."""
        return np.log1p((recent @ self.transitions).toarray())

    def evidence(self, recent: sp.csr_matrix, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """The recent profile's movies (one row) that `movie` follows in others' histories, strongest first, with
        their terms of its score (before the log): recency weight x transitions[recent movie, movie]."""
        return terms_of(recent, self.transitions, movie)
