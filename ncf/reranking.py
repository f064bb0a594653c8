"""Retrieval, then re-ranking: the top-k every recommender serves, is evaluated on and is chosen by.

A retriever fitted on who rated what (`ncf.retrieval`) proposes each user's best unseen
movies; the NCF re-ranks the first `n_candidates` of them by the blend of standardised
scores (`ncf.retrieval.blend`) with its heads' signals. Training (validation every
epoch), evaluation, the registered model and Ray Serve all rank through `top_k`, so
what is measured is what is served. The blend's settings are chosen on the validation
slice by `choose_reranking`, with a model and a retriever that were fitted without it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ncf.config import EvaluationConfig, RetrievalConfig
from ncf.data import Ratings
from ncf.evaluation import relevant_targets
from ncf.metrics import K, full_ranking_per_user, full_ranking_summary
from ncf.model import NCF, MovieSide, forward_batched
from ncf.ranking import SeenItems, top_k_unseen
from ncf.retrieval import ALS, EASE, Sequence, blend, configured_retriever, fit_on_ratings, strongest_first

HEAD_SIGNALS = {"rating": "rating", "interaction": "logit"}  # head -> the ModelOutput field re-ranking reads


@dataclass
class Reranking:
    """How many retrieved candidates the NCF re-ranks, and each head's weight in the blend."""

    n_candidates: int
    weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: RetrievalConfig) -> Reranking:
        return cls(cfg.n_candidates, {"rating": cfg.rating_weight, "interaction": cfg.interaction_weight})

    def width(self, k: int) -> int:
        """How many candidates a top-k retrieves: the re-ranked ones, and at least k."""
        return max(self.n_candidates, k)


class CandidateRetriever:
    """A fitted retriever, with the most rated movies for users it cannot score (no rating >= its
    `min_rating` to build a profile from): without them those users' candidates would be arbitrary.
    With a `sequence` (`ncf.retrieval.Sequence`, fitted on the same ratings), a user's scores are the blend
    z(retriever) + sequence_weight * z(sequence) over the catalogue (`ncf.retrieval.blend`)."""

    def __init__(self, retriever: EASE | ALS, ratings: Ratings, min_rating: float | None, n_users: int,
                 n_movies: int, sequence: Sequence | None = None, sequence_weight: float = 0.0):
        self.retriever = retriever
        self.sequence, self.sequence_weight = sequence, sequence_weight
        kept = ratings.rating >= min_rating if min_rating is not None else np.ones(len(ratings), bool)
        # Each user's profile movies (what the scores are built from), grouped by user: ALS's evidence reads one
        # user's in place of scanning every rating, and no copy of the ratings is kept.
        self.profile_movies = SeenItems(ratings.user[kept], ratings.movie[kept], n_users)
        self.no_profile = self.profile_movies.counts() == 0
        self.fallback = np.log1p(np.bincount(ratings.movie, minlength=n_movies).astype(np.float32))

    @property
    def name(self) -> str:
        return self.retriever.name

    def score(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users)
        scores = np.asarray(self.retriever.score(users), dtype=np.float32)
        empty = self.no_profile[users]
        if empty.any():
            scores[empty] = self.fallback
        if self.sequence is None:
            return scores
        return blend(scores, {"sequence": self.sequence.score(users)}, {"sequence": self.sequence_weight}).astype(
            np.float32)

    def evidence(self, user: int, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """The user's profile movies behind `movie`'s retrieval score, strongest first, and their shares:
        for EASE exactly the terms of the score (profile weight x B[j, movie]); for ALS the cosine of
        the item factors (ALS scores have no per-movie terms)."""
        r = self.retriever
        if isinstance(r, EASE):
            row = r.profiles[user]
            position = np.searchsorted(r.items, np.r_[row.indices, movie])
            position = np.minimum(position, len(r.items) - 1)
            kept = r.items[position] == np.r_[row.indices, movie]
            if not kept[-1]:
                return np.empty(0, np.int64), np.empty(0)
            movies = row.indices[kept[:-1]]
            shares = row.data[kept[:-1]] * r.weights[position[:-1][kept[:-1]], position[-1]]
        else:
            movies = np.unique(self.profile_movies.of(user))
            vectors = r.item_factors[np.r_[movies, movie]]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            shares = vectors[:-1] @ vectors[-1]
        return strongest_first(movies, shares, movie)

    def sequence_evidence(self, user: int, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """The user's recent movies behind `movie`'s sequence score (`Sequence.evidence`); none without one."""
        if self.sequence is None:
            return np.empty(0, np.int64), np.empty(0)
        return self.sequence.evidence(user, movie)


def fit_retriever(cfg: RetrievalConfig, ratings: Ratings, n_users: int, n_movies: int,
                  seed: int = 0) -> CandidateRetriever | None:
    """The configured retriever fitted on `ratings` (None for `retriever: none`)."""
    if cfg.retriever == "none":
        return None
    model = fit_on_ratings(configured_retriever(cfg.retriever, cfg, seed), ratings, n_users, n_movies, cfg)
    return candidate_retriever(model, cfg, ratings, n_users, n_movies)


def candidate_retriever(retriever: EASE | ALS, cfg: RetrievalConfig, ratings: Ratings, n_users: int,
                        n_movies: int) -> CandidateRetriever:
    """A fitted retriever with what `cfg` adds to it from `ratings`, the ones it was fitted on: its fallback and,
    when `sequence_weight` is set, the sequence signal."""
    sequence = (Sequence(cfg.sequence_window, cfg.sequence_last, cfg.sequence_decay).fit(ratings, n_users, n_movies)
                if cfg.sequence_weight else None)
    return CandidateRetriever(retriever, ratings, cfg.min_rating, n_users, n_movies, sequence, cfg.sequence_weight)


# Users [U], candidate movies [U, N] -> each head's signal on every candidate, [U, N] per head.
PairSignals = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def model_signals(model: NCF) -> PairSignals:
    """The model's heads on (user, candidate) pairs: the rating head's predicted rating, the interaction
    head's logit."""

    def signals(users: np.ndarray, candidates: np.ndarray) -> dict[str, np.ndarray]:
        out = forward_batched(model, np.repeat(users, candidates.shape[1]), candidates.ravel())
        return {head: getattr(out, HEAD_SIGNALS[head]).numpy().reshape(candidates.shape) for head in model.heads}

    return signals


def blended_pairs(model: NCF, retriever: CandidateRetriever | None, reranking: Reranking, users: np.ndarray,
                  candidates: np.ndarray) -> np.ndarray:
    """Scores of given (user, candidate) pairs as the served ranking orders them: the blend over the row's
    candidates, or the model's ranking logit without a retriever (the sampled protocol's question)."""
    if retriever is None:
        out = forward_batched(model, np.repeat(users, candidates.shape[1]), candidates.ravel())
        return out.logit.numpy().reshape(candidates.shape)
    retrieved = np.take_along_axis(retriever.score(users), candidates, axis=1)
    return blend(retrieved, model_signals(model)(users, candidates), reranking.weights)


def rerank(candidates: np.ndarray, retrieved: np.ndarray, signals: dict[str, np.ndarray], reranking: Reranking,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n_candidates` columns ordered by the blend, then the rest in the retriever's order
    (each scored below every re-ranked one); the first `k` of each row, with their scores."""
    n = min(reranking.n_candidates, candidates.shape[1])
    blended = blend(retrieved[:, :n], {h: s[:, :n] for h, s in signals.items()}, reranking.weights)
    order = np.argsort(-blended, axis=1, kind="stable")
    items = np.concatenate([np.take_along_axis(candidates[:, :n], order, axis=1), candidates[:, n:]], axis=1)
    scores = np.take_along_axis(blended, order, axis=1)
    floor = np.where(np.isfinite(scores), scores, 0.0).min(axis=1, keepdims=True)
    tail = np.where(np.isfinite(retrieved[:, n:]), floor - 1.0 - np.arange(candidates.shape[1] - n), -np.inf)
    return items[:, :k], np.concatenate([scores, tail], axis=1)[:, :k]


class Retrieved:
    """The retriever's top `width` unseen movies of fixed users and their scores, retrieved once: validation
    re-ranks the same users' candidates every epoch, and only the model changes between epochs."""

    def __init__(self, retriever: CandidateRetriever, users: np.ndarray, seen: SeenItems, width: int):
        self.users, self.width = np.asarray(users, dtype=np.int64), width
        self.candidates, self.scores = top_k_unseen(retriever.score, self.users, seen, width)

    def rows(self, users: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Candidates and scores if `users` and `width` are exactly those retrieved for (a narrower top-k
        may order tied scores differently), else None."""
        if width != self.width or not np.array_equal(users, self.users):
            return None
        return self.candidates, self.scores


def top_k(model: NCF, retriever: CandidateRetriever | None, reranking: Reranking, users: np.ndarray,
          seen: SeenItems, k: int, movie_side: MovieSide | None = None, chunk: int = 256,
          retrieved: Retrieved | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each user's k best unseen movies (indices [U, k]) and their scores, best first: retrieval then
    re-ranking, or the model alone over the whole catalogue without a retriever. Scores are -inf
    where a user has fewer than k unseen movies to offer. `retrieved`: the retrieval already done for these
    users (used when it covers them)."""
    users = np.asarray(users, dtype=np.int64)
    if retriever is None:
        return top_k_unseen(lambda batch: model.score_users(torch.as_tensor(batch), movie_side=movie_side),
                            users, seen, k)
    signals = model_signals(model)
    width = reranking.width(k)
    cached = retrieved.rows(users, width) if retrieved is not None else None
    items, scores = [], []
    for start in range(0, len(users), chunk):
        batch = users[start: start + chunk]
        candidates, scored = ((cached[0][start: start + chunk], cached[1][start: start + chunk]) if cached
                              else top_k_unseen(retriever.score, batch, seen, width))
        n = min(reranking.n_candidates, candidates.shape[1])
        got = rerank(candidates, scored, signals(batch, candidates[:, :n]), reranking, k)
        items.append(got[0])
        scores.append(got[1])
    return np.concatenate(items), np.concatenate(scores)


def choose_reranking(model: NCF, retriever: CandidateRetriever, seen: SeenItems, target: Ratings, n_movies: int,
                     cfg: RetrievalConfig, k: int = K, sample: EvaluationConfig | None = None) -> tuple[
                         Reranking, dict[str, float], list[dict]]:
    """The grid point of `cfg`'s grids with the best full-ranking NDCG@k against `target` (the validation
    slice; `model` and `retriever` must not have seen it) over `sample`'s users (all without one), its
    metrics, and every grid point's figures.

    Candidates and head signals are computed once for the largest N; each grid point only re-blends.
    Weights of heads the model lacks are not searched. Ties keep the earlier grid point.
    """
    users, rows, movies = relevant_targets(target, sample)
    width = max(cfg.n_candidates_grid)
    candidates, retrieved = top_k_unseen(retriever.score, users, seen, width)
    signals = model_signals(model)(users, candidates)
    grids = {"rating": cfg.rating_weight_grid, "interaction": cfg.interaction_weight_grid}
    heads = list(signals)
    table, best = [], None
    for n in cfg.n_candidates_grid:
        for weights in itertools.product(*(grids[h] for h in heads)):
            reranking = Reranking(n, dict(zip(heads, weights, strict=True)))
            top, _ = rerank(candidates, retrieved, signals, reranking, k)
            metrics = full_ranking_summary(full_ranking_per_user(top, rows, movies, n_movies), top, n_movies)
            table.append({"n_candidates": n, **{f"{h}_weight": w for h, w in reranking.weights.items()}, **metrics})
            if best is None or metrics[f"full_ndcg_at_{k}"] > best[1][f"full_ndcg_at_{k}"]:
                best = (reranking, metrics)
    return best[0], best[1], table
