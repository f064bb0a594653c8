"""The user side of `model.architecture: history`: a user is their id's embedding plus an attention-pooled
summary of their most recent rated movies, each read with its rating and recency (the neighbourhood terms of
Koren's SVD++ and asymmetric SVD, 2008, with learned attention in place of a fixed normalisation).

The encoder keeps every user's rated movies in time order (`remember`), so each training pair reads only the
ratings the user gave before the one it predicts: the pooled window ends just before the pair's own movie, and a
pair whose movie the user never rated (validation, test, a sampled unrated movie, serving) reads the latest
`model.history_length` ratings. A profile the model never saw (a new or live user) is pooled from its own
ratings (`profile_vectors`): no id embedding is needed to rank it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ncf.data import Ratings
from ncf.retrievers.history import RATING_BUCKETS, attention_features


class RatingHistory:
    """Each row's ratings in time order as flat tensors (movie, half-star bucket) with row offsets, and the
    position of every (row, movie) among them: what the encoder's windows are cut from."""

    def __init__(self, rows: np.ndarray, movies: np.ndarray, buckets: np.ndarray, n_rows: int, n_movies: int):
        self.movies, self.buckets = torch.as_tensor(movies), torch.as_tensor(buckets)
        self.offsets = torch.from_numpy(np.searchsorted(rows, np.arange(n_rows + 1)))
        keys = rows.astype(np.int64) * n_movies + movies
        order = np.argsort(keys, kind="stable")
        self.keys, self.positions = torch.from_numpy(keys[order]), torch.from_numpy(order)
        self.n_movies = n_movies

    @classmethod
    def of(cls, ratings: Ratings, n_rows: int, n_movies: int) -> RatingHistory:
        """From `ratings` whose `user` column is the row; an unknown rating (NaN: a profile of movies alone) reads
        as a 5-star one."""
        order = np.lexsort((np.arange(len(ratings)), ratings.timestamp, ratings.user))
        rows, movies = ratings.user[order], ratings.movie[order]
        buckets, _ = attention_features(np.nan_to_num(ratings.rating[order], nan=5.0), 0)
        return cls(rows, movies, buckets, n_rows, n_movies)

    def packed(self) -> torch.Tensor:
        """[3, ratings]: row, movie and bucket of every rating, in time order within each row."""
        rows = torch.repeat_interleave(torch.arange(len(self.offsets) - 1), torch.diff(self.offsets))
        return torch.stack([rows, self.movies, self.buckets])

    @classmethod
    def unpacked(cls, packed: torch.Tensor, n_rows: int, n_movies: int) -> RatingHistory:
        rows, movies, buckets = packed.numpy()
        return cls(rows, movies, buckets, n_rows, n_movies)

    def window(self, rows: torch.Tensor, before: torch.Tensor | None, length: int):
        """The latest `length` ratings of each row given before its rating of `before` (all of its ratings
        where it has none): movies, buckets, ages (0: the latest read) and a validity mask, each [rows, length]."""
        ends = self.offsets[rows + 1]
        if before is not None and len(self.keys):
            keys = rows * self.n_movies + before
            found = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
            ends = torch.where(self.keys[found] == keys, self.positions[found], ends)
        steps = torch.arange(length, device=rows.device)
        index = ends[:, None] - length + steps
        valid = index >= self.offsets[rows][:, None]
        index = index.clamp(min=0, max=max(len(self.movies) - 1, 0))
        if not len(self.movies):
            empty = torch.zeros_like(index)
            return empty, empty, empty, torch.zeros_like(valid)
        return self.movies[index], self.buckets[index], (length - 1 - steps).expand_as(index), valid


class HistoryEncoder(nn.Module):
    """The pooled part of a history model's user vector: over the window, softmax(a[rating] + s log(1 + age))
    weights each movie's embedding (a table of its own) times v[rating], so a disliked movie can point away from
    what it is (asymmetric SVD's (r - b) x_j). a and v (per half-star) and s are learned; v starts at -1 for
    0 stars rising to 1 for 5.

    Chosen on the validation slice (recommender preset, val RMSE; the deck's MLP without history 0.8266): the
    weighted sum times sqrt(window size), as SVD++ scales, 0.8523, and 0.8427 with the values v; the weighted mean
    0.8383, and 0.8271 with v (this form).

    The users' histories are this module's extra state: saved with the weights, never broadcast by DDP (every
    rank remembers the same ratings itself)."""

    def __init__(self, n_users: int, n_movies: int, dim: int, length: int, sparse: bool):
        super().__init__()
        self.n_users, self.n_movies, self.length = n_users, n_movies, length
        self.embedding = nn.Embedding(n_movies, dim, sparse=sparse)
        self.rating_logit = nn.Parameter(torch.zeros(RATING_BUCKETS))
        self.age_slope = nn.Parameter(torch.zeros(()))
        self.rating_value = nn.Parameter(torch.empty(RATING_BUCKETS))
        self.history = RatingHistory.of(Ratings.none(), n_users, n_movies)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.embedding.weight)
        nn.init.zeros_(self.rating_logit)
        nn.init.zeros_(self.age_slope)
        with torch.no_grad():
            self.rating_value.copy_(torch.linspace(-1, 1, RATING_BUCKETS))

    def remember(self, ratings: Ratings) -> None:
        """Read the users' histories from `ratings` (train while searching, train + validation when refitting)."""
        self.history = RatingHistory.of(ratings, self.n_users, self.n_movies)

    def get_extra_state(self) -> torch.Tensor:
        return self.history.packed()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.history = RatingHistory.unpacked(state, self.n_users, self.n_movies)

    def forward(self, users: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled vectors of `users`, each from the ratings given before its rating of `before` (if any)."""
        return self.pool(*self.history.window(users.cpu(), None if before is None else before.cpu(), self.length))

    def profile_vectors(self, ratings: Ratings, n_rows: int) -> torch.Tensor:
        """The pooled vectors of profiles (`ratings.user`: the row), from each row's latest ratings."""
        history = RatingHistory.of(ratings, n_rows, self.n_movies)
        return self.pool(*history.window(torch.arange(n_rows), None, self.length))

    @torch.no_grad()
    def shares(self, ratings: Ratings, direction: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Each movie of one profile's window (`ratings`: its ratings, `user` column 0, as `Profiles.of(0)` gives
        them) with its term of the pooled vector's dot product with `direction` (the gradient of a score with
        respect to the user vector): how much the attention on that rating moved the score. The terms add up to
        that dot product."""
        history = RatingHistory.of(ratings, 1, self.n_movies)
        movies, buckets, ages, valid = history.window(torch.zeros(1, dtype=torch.int64), None, self.length)
        weights, values = self.attend(movies, buckets, ages, valid)
        terms = weights[0] * (values[0] @ direction.to(values.dtype))
        return movies[0][valid[0]].numpy(), terms[valid[0].to(terms.device)].cpu().double().numpy()

    def pool(self, movies: torch.Tensor, buckets: torch.Tensor, ages: torch.Tensor,
             valid: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bl,bld->bd", *self.attend(movies, buckets, ages, valid))

    def attend(self, movies: torch.Tensor, buckets: torch.Tensor, ages: torch.Tensor,
               valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's attention weights [rows, length] and its movies' values [rows, length, dim]."""
        device = self.embedding.weight.device
        movies, buckets, ages, valid = (t.to(device) for t in (movies, buckets, ages, valid))
        logit = self.rating_logit[buckets] + self.age_slope * torch.log1p(ages.float())
        weights = torch.nan_to_num(torch.softmax(logit.masked_fill(~valid, float("-inf")), dim=1))
        return weights, self.embedding(movies) * self.rating_value[buckets][..., None]
