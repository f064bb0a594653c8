"""Reference models, scored with the same metrics as the NCF model.

Each exposes `predict(users, movies)` for ratings and/or `score(users)` for
ranking the whole catalogue; `None` marks what a model cannot do.
Baselines fit on train + validation: they have no epochs to stop early.
"""

from __future__ import annotations

import numpy as np

from ncf.data import Ratings


class GlobalMean:
    name = "global_mean"
    score = None

    def fit(self, ratings: Ratings, n_users: int, n_movies: int) -> GlobalMean:
        self.mean = float(ratings.rating.mean())
        return self

    def predict(self, users: np.ndarray, movies: np.ndarray) -> np.ndarray:
        return np.full(len(users), self.mean)


class UserItemBias:
    """mean + b_user + b_movie, fitted by alternating regularised least squares; predictions are clipped to the
    scale of the ratings it was fitted on (the dataset's: half stars 0.5-5 or whole stars 1-5)."""

    name = "user_item_bias"

    def __init__(self, reg: float = 5.0, iterations: int = 10):
        self.reg, self.iterations = reg, iterations

    def fit(self, ratings: Ratings, n_users: int, n_movies: int) -> UserItemBias:
        u, m, r = ratings.user, ratings.movie, ratings.rating
        self.mean = float(r.mean())
        self.rating_range = float(r.min()), float(r.max())
        self.user_bias, self.movie_bias = np.zeros(n_users), np.zeros(n_movies)
        n_u = np.bincount(u, minlength=n_users)
        n_m = np.bincount(m, minlength=n_movies)
        for _ in range(self.iterations):
            residual = r - self.mean - self.movie_bias[m]
            self.user_bias = np.bincount(u, weights=residual, minlength=n_users) / (self.reg + n_u)
            residual = r - self.mean - self.user_bias[u]
            self.movie_bias = np.bincount(m, weights=residual, minlength=n_movies) / (self.reg + n_m)
        return self

    def predict(self, users: np.ndarray, movies: np.ndarray) -> np.ndarray:
        return np.clip(self.mean + self.user_bias[users] + self.movie_bias[movies], *self.rating_range)

    def score(self, users: np.ndarray) -> np.ndarray:
        return self.mean + self.user_bias[users][:, None] + self.movie_bias[None, :]


class MostPopular:
    """Ranks by number of ratings: what a rating model must beat on full ranking."""

    name = "most_popular"
    predict = None

    def fit(self, ratings: Ratings, n_users: int, n_movies: int) -> MostPopular:
        self.popularity = np.bincount(ratings.movie, minlength=n_movies).astype(np.float32)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.popularity, (len(users), len(self.popularity)))


BASELINES = (GlobalMean, UserItemBias, MostPopular)
