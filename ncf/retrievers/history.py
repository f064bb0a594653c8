"""The history model: a neural retriever that reads a user's whole profile, each rated movie with its rating and
recency, pooled by attention, and scores the whole catalogue (Mult-DAE's objective, Liang et al. 2018)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from ncf.retrievers.base import RatedEntries, Retriever, RetrieverSettings, strongest_first

RATING_BUCKETS = 11  # half-star steps 0..5


class HistorySettings(RetrieverSettings):
    """`retrieval.history`: the network's width, its training (epochs, learning rate, input dropout, L2 weight
    decay, users per step) and its seed."""

    dimension: int = Field(gt=0)
    epochs: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    item_dropout: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    batch_users: int = Field(gt=0)


class History(Retriever):
    """A user is the attention-weighted sum of the embeddings of the movies in their profile (ratings >=
    `retrieval.min_rating`), through tanh; a movie's score is that vector's dot product with the movie's output
    embedding plus its bias, over every movie the fit saw (the rest score -inf).

    Attention: each profile movie's weight is softmax(a[rating] + s * log(1 + age)) over the profile, times the
    configured profile weight (`retrieval.recency_half_life`, `profile_rating_offset`), scaled by sqrt(profile
    size); a (per half-star) and s are learned, so the network decides how much a 5-star or an older rating
    counts. The configured weight applies when scoring only (training reads the learned part alone; on the
    validation slice recency at scoring time added up to 0.004 NDCG@10). The profile rows it scores (`weigh`)
    already hold exp(a[rating] + s log(1 + age)) x the configured weight: `score` normalises them.

    Training (`fit_entries`): the multinomial likelihood of each user's whole profile under a softmax over the
    catalogue, from the profile with each movie left out with probability `item_dropout` (a denoising
    autoencoder: no sampled negatives, every movie in every step). One user is one training row, `batch_users`
    users per AdamW step; deterministic for a seed on one thread.
    """

    name = "history"
    Settings = HistorySettings
    weighs_profiles = True
    fits_in_seconds = False

    def __init__(self, dimension: int = 600, epochs: int = 100, learning_rate: float = 3e-3,
                 item_dropout: float = 0.5, weight_decay: float = 0.0, batch_users: int = 1024, seed: int = 0):
        self.dimension, self.epochs, self.learning_rate = dimension, epochs, learning_rate
        self.item_dropout, self.weight_decay = item_dropout, weight_decay
        self.batch_users, self.seed = batch_users, seed
        self.items: np.ndarray | None = None  # movies the fit saw, ascending
        self.inputs = self.outputs = self.bias = None  # [items, d], [items, d], [items] float32
        self.rating_logit: np.ndarray | None = None  # [RATING_BUCKETS]
        self.age_slope = 0.0

    @classmethod
    def from_settings(cls, settings: HistorySettings, seed: int = 0) -> History:
        return cls(settings.dimension, settings.epochs, settings.learning_rate, settings.item_dropout,
                   settings.weight_decay, settings.batch_users, seed)

    def fit(self, interactions: sp.csr_matrix) -> History:
        """On who liked what alone: every rating 5 and as recent as the rest."""
        interactions = sp.csr_matrix(interactions, dtype=np.float32)
        return self.fit_entries(RatedEntries(interactions, np.full(interactions.nnz, 5.0), np.zeros(interactions.nnz)))

    def fit_entries(self, entries: RatedEntries) -> History:
        counts = entries.matrix.getnnz(axis=0)
        self.items = np.flatnonzero(counts > 0)
        matrix = entries.matrix[:, self.items].tocsr()  # the same entries, same order: columns renumbered
        users = np.flatnonzero(np.diff(matrix.indptr) > 0)
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        network = _Network(len(self.items), self.dimension)
        optimizer = torch.optim.AdamW(network.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        rows = _Rows(matrix, entries.rating, entries.age)
        for _ in range(self.epochs):
            order = users[torch.randperm(len(users), generator=generator).numpy()]
            for start in range(0, len(order), self.batch_users):
                profile, buckets, ages = rows.dense(order[start: start + self.batch_users])
                kept = profile & (torch.rand(profile.shape, generator=generator) >= self.item_dropout)
                logits = network(kept, buckets, ages)
                loss = -(torch.log_softmax(logits, dim=1) * profile).sum(1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.inputs, self.outputs, self.bias = (p.detach().numpy().astype(np.float32) for p in
                                                 (network.inputs, network.outputs, network.bias))
        self.rating_logit = network.rating_logit.detach().numpy().astype(np.float32)
        self.age_slope = float(network.age_slope.detach())
        return self

    def weigh(self, entries: RatedEntries, configured: np.ndarray) -> np.ndarray:
        """The learned attention (before its softmax's normalisation) times the configured weight."""
        return configured * np.exp(self._logit(entries.rating, entries.age))

    def _logit(self, rating: np.ndarray, age: np.ndarray) -> np.ndarray:
        buckets, log_age = attention_features(rating, age)
        return self.rating_logit[buckets] + self.age_slope * log_age

    def _user_vectors(self, profiles: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
        """Each profile's normalised attention over the fitted movies and its pre-activation vector."""
        kept = sp.csr_matrix(profiles, dtype=np.float32)[:, self.items]
        totals = np.asarray(kept.sum(axis=1)).ravel()
        sizes = np.diff(kept.indptr)
        scale = np.divide(np.sqrt(sizes), totals, out=np.zeros_like(totals), where=totals > 0)
        attention = sp.diags(scale.astype(np.float32)) @ kept
        return attention, np.asarray(attention @ self.inputs)

    def score(self, profiles: sp.csr_matrix) -> np.ndarray:
        _, hidden = self._user_vectors(profiles)
        out = np.full((profiles.shape[0], profiles.shape[1]), -np.inf, dtype=np.float32)
        out[:, self.items] = np.tanh(hidden) @ self.outputs.T + self.bias
        return out

    def evidence(self, profile: sp.csr_matrix, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """Each profile movie's share of the score's user-dependent part, linearised through tanh at the
        profile's vector: attention x (input embedding . tanh'(h) * output embedding of `movie`)."""
        position = np.searchsorted(self.items, movie)
        if position >= len(self.items) or self.items[position] != movie:
            return np.empty(0, np.int64), np.empty(0)
        attention, hidden = self._user_vectors(sp.csr_matrix(profile))
        slope = 1.0 - np.tanh(hidden[0]) ** 2
        row = attention.tocsr()
        shares = row.data * (self.inputs[row.indices] @ (slope * self.outputs[position]))
        return strongest_first(self.items[row.indices], shares, movie)

    def arrays(self) -> dict[str, np.ndarray]:
        settings = [self.dimension, self.epochs, self.learning_rate, self.item_dropout, self.weight_decay,
                    self.batch_users, self.seed]
        return {"settings": np.asarray(settings, dtype=np.float64), "items": self.items, "inputs": self.inputs,
                "outputs": self.outputs, "bias": self.bias, "rating_logit": self.rating_logit,
                "age_slope": np.asarray(self.age_slope)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> History:
        d, epochs, lr, dropout, decay, batch, seed = arrays["settings"].tolist()
        model = cls(int(d), int(epochs), lr, dropout, decay, int(batch), int(seed))
        model.items, model.inputs, model.outputs, model.bias = (arrays[k] for k in ("items", "inputs", "outputs",
                                                                                     "bias"))
        model.rating_logit, model.age_slope = arrays["rating_logit"], float(arrays["age_slope"])
        return model


def attention_features(rating: np.ndarray, age: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the attention reads of each profile entry, in training and scoring alike: its half-star bucket and
    log(1 + age)."""
    buckets = np.clip(np.rint(np.asarray(rating) * 2), 0, RATING_BUCKETS - 1).astype(np.int64)
    return buckets, np.log1p(np.maximum(age, 0))


class _Rows:
    """Dense batches of training rows from a CSR of profiles with each entry's rating and age."""

    def __init__(self, matrix: sp.csr_matrix, rating: np.ndarray, age: np.ndarray):
        self.matrix = matrix
        buckets, log_age = attention_features(rating, age)
        self.buckets = sp.csr_matrix((buckets, matrix.indices, matrix.indptr), shape=matrix.shape)
        self.ages = sp.csr_matrix((log_age, matrix.indices, matrix.indptr), shape=matrix.shape)

    def dense(self, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        profile = torch.from_numpy(self.matrix[users].toarray() > 0)
        buckets = torch.from_numpy(self.buckets[users].toarray()).long()
        ages = torch.from_numpy(self.ages[users].toarray()).float()
        return profile, buckets, ages


class _Network(torch.nn.Module):
    """The trainable form of `History`: the same pooling and scoring on dense rows."""

    def __init__(self, n_items: int, dimension: int):
        super().__init__()
        self.inputs = torch.nn.Parameter(torch.randn(n_items, dimension) * (0.1 / dimension ** 0.5))
        self.outputs = torch.nn.Parameter(torch.randn(n_items, dimension) / dimension ** 0.5)
        self.bias = torch.nn.Parameter(torch.zeros(n_items))
        self.rating_logit = torch.nn.Parameter(torch.zeros(RATING_BUCKETS))
        self.age_slope = torch.nn.Parameter(torch.zeros(()))

    def forward(self, kept: torch.Tensor, buckets: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        logit = (self.rating_logit[buckets] + self.age_slope * ages).masked_fill(~kept, float("-inf"))
        attention = torch.nan_to_num(torch.softmax(logit, dim=1)) * kept.sum(1, keepdim=True).float().sqrt()
        return torch.tanh(attention @ self.inputs) @ self.outputs.T + self.bias
