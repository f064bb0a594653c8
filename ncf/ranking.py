"""Retrieval, then re-ranking: the top-k every recommender serves, is evaluated on and is chosen by.

A retriever fitted on who rated what (`ncf.retrievers`) proposes each user's best unseen
movies; the NCF re-ranks the first `n_candidates` of them by the blend of standardised
scores (`blend`) with its heads' signals. Training (validation every
epoch), evaluation, the registered model, Ray Serve and batch jobs all rank through
`rank_profiles` (`top_k` by user index), so what is measured is what is served; its input,
users' ratings, is `ncf.user_ratings`. The blend's settings are chosen on the validation
slice by `ncf.reranking_search.choose_reranking`, with a model and a retriever that were
fitted without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ncf.config import RetrievalConfig
from ncf.data import Ratings
from ncf.model import NCF, MovieSide, UserSide, forward_batched
from ncf.retrievers import NO_RETRIEVER, Retriever
from ncf.retrievers.matrices import fit_on_ratings, user_profiles
from ncf.retrievers.sequence import Sequence
from ncf.user_ratings import Profiles, SeenItems

HEAD_SIGNALS = {"rating": "rating", "interaction": "logit"}  # head -> the ModelOutput field re-ranking reads
# Scores a batch of user indices against the whole catalogue: [len(users), n_movies].
ScoreFn = Callable[[np.ndarray], np.ndarray | torch.Tensor]


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


@dataclass(frozen=True)
class ProfileMatrices:
    """`Profiles` as the retrieval stage reads them, one row per profile: the matrix its retriever scores and,
    with a sequence signal, the recent profile the signal scores (`CandidateRetriever.matrices`)."""

    retriever: sp.csr_matrix
    recent: sp.csr_matrix | None


class CandidateRetriever:
    """The retrieval stage: a fitted retriever (`ncf.retrievers`), with the most rated movies for profiles it
    cannot score (no rating >= `min_rating`): without them those users' candidates would be arbitrary. With a
    `sequence` (`ncf.retrievers.sequence.Sequence`, fitted on the same ratings), a profile's scores are the blend
    z(retriever) + sequence.weight * z(sequence) over the catalogue (`blend`). It scores any `Profiles`
    (`score_profiles`); `known` are the profiles of the ratings it was built with, which `score` reads by user."""

    def __init__(self, retriever: Retriever, cfg: RetrievalConfig, ratings: Ratings, n_users: int, n_movies: int,
                 sequence: Sequence | None = None):
        self.retriever, self.cfg, self.n_movies = retriever, cfg, n_movies
        self.sequence, self.sequence_weight = sequence, cfg.sequence.weight
        self.fallback = np.log1p(np.bincount(ratings.movie, minlength=n_movies).astype(np.float32))
        self.known = Profiles.of_ratings(ratings, n_users)

    @property
    def name(self) -> str:
        return self.retriever.name

    def matrices(self, profiles: Profiles) -> ProfileMatrices:
        """What this stage scores of `profiles`: the retriever's profile rows (`user_profiles`: min_rating,
        recency and rating weights) and the sequence signal's recent rows."""
        rows, ratings = len(profiles), profiles.ratings
        return ProfileMatrices(user_profiles(ratings, rows, self.n_movies, self.cfg, self.retriever),
                               None if self.sequence is None else self.sequence.profiles(ratings, rows, self.n_movies))

    def score_profiles(self, profiles: Profiles) -> np.ndarray:
        """[profiles, n_movies] float32: the retriever's scores (the most rated movies' for a profile with nothing
        it can score), blended with the sequence signal's."""
        matrices = self.matrices(profiles)
        scores = np.asarray(self.retriever.score(matrices.retriever), dtype=np.float32)
        empty = np.diff(matrices.retriever.indptr) == 0
        if empty.any():
            scores[empty] = self.fallback
        if self.sequence is None:
            return scores
        return blend(scores, {"sequence": self.sequence.score(matrices.recent)},
                     {"sequence": self.sequence_weight}).astype(np.float32)

    def score(self, users: np.ndarray) -> np.ndarray:
        """The scores of known users' profiles (by index)."""
        return self.score_profiles(self.known.take(users))

    def evidence(self, profile: Profiles, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """The profile's movies (its first row) behind `movie`'s retrieval score, strongest first, with their
        shares (`Retriever.evidence`)."""
        return self.retriever.evidence(self.matrices(profile).retriever[0], movie)

    def sequence_evidence(self, profile: Profiles, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """The profile's recent movies (its first row) behind `movie`'s sequence score (`Sequence.evidence`); none
        without a sequence signal."""
        if self.sequence is None:
            return np.empty(0, np.int64), np.empty(0)
        return self.sequence.evidence(self.matrices(profile).recent[0], movie)


def fit_retriever(cfg: RetrievalConfig, ratings: Ratings, n_users: int, n_movies: int,
                  seed: int = 0) -> CandidateRetriever | None:
    """The configured retriever fitted on `ratings` (None for `retriever: none`)."""
    if cfg.retriever == NO_RETRIEVER:
        return None
    model = fit_on_ratings(cfg.retriever, cfg, ratings, n_users, n_movies, seed)
    return candidate_retriever(model, cfg, ratings, n_users, n_movies)


def candidate_retriever(retriever: Retriever, cfg: RetrievalConfig, ratings: Ratings, n_users: int,
                        n_movies: int) -> CandidateRetriever:
    """A fitted retriever with what `cfg` adds to it from `ratings`, the ones it was fitted on: its fallback and,
    when `sequence.weight` is set, the sequence signal."""
    s = cfg.sequence
    sequence = Sequence(s.window, s.last, s.decay).fit(ratings, n_movies) if s.weight else None
    return CandidateRetriever(retriever, cfg, ratings, n_users, n_movies, sequence)


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


# Users [U], candidate movies [U, N] -> each head's signal on every candidate, [U, N] per head.
PairSignals = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def model_signals(model: NCF, user_side: UserSide | None = None) -> PairSignals:
    """The model's heads on (user, candidate) pairs: the rating head's predicted rating, the interaction
    head's logit. With `user_side`, the users are its rows (folded-in users, `ncf.fold_in`), not user indices."""

    def signals(users: np.ndarray, candidates: np.ndarray) -> dict[str, np.ndarray]:
        out = forward_batched(model, np.repeat(users, candidates.shape[1]), candidates.ravel(), user_side=user_side)
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


def retrieve(retriever: CandidateRetriever, profiles: Profiles, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each profile's `width` best-scored movies outside its own, best first, and their scores."""
    return top_k_unseen(lambda rows: retriever.score_profiles(profiles.take(rows)), np.arange(len(profiles)),
                        profiles.seen(), width)


def own_profiles(retriever: CandidateRetriever | None, users: np.ndarray, seen: SeenItems) -> Profiles:
    """The profiles of known `users` for a ranking by user index: the ratings `retriever` was built with, whose
    movies `seen` must hold (a ranking leaves out a profile's own movies); without a retriever, only what they
    rated (`seen`), all the model alone reads."""
    if retriever is None:
        return Profiles.of_seen(seen, users)
    if not np.array_equal(seen.counts(), retriever.known.counts()):
        raise ValueError("a ranking by user index leaves out each user's own movies: `seen` must be the movies of "
                         "the ratings the retriever was built with")
    return retriever.known.take(users)


class Retrieved:
    """The retriever's top `width` unseen movies of fixed users and their scores, retrieved once: validation
    re-ranks the same users' candidates every epoch, and only the model changes between epochs."""

    def __init__(self, retriever: CandidateRetriever, users: np.ndarray, seen: SeenItems, width: int):
        self.users, self.width = np.asarray(users, dtype=np.int64), width
        self.candidates, self.scores = retrieve(retriever, own_profiles(retriever, self.users, seen), width)

    def rows(self, users: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Candidates and scores if `users` and `width` are exactly those retrieved for (a narrower top-k
        may order tied scores differently), else None."""
        if width != self.width or not np.array_equal(users, self.users):
            return None
        return self.candidates, self.scores


def rank_profiles(model: NCF, retriever: CandidateRetriever | None, reranking: Reranking, profiles: Profiles, k: int,
                  movie_side: MovieSide | None = None, popularity: np.ndarray | None = None, chunk: int = 256,
                  retrieved: Retrieved | None = None,
                  user_side: UserSide | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The one ranking: each profile's k best movies outside its own (indices [P, k]) and their scores, best first;
    -inf where a profile leaves fewer than k movies to offer.

    With a retriever: its top `reranking.width(k)` for the profile's ratings (`CandidateRetriever.score_profiles`:
    the most rated movies only for a profile with nothing it can score), then, where the profile's user has an
    embedding, re-ranked with the NCF heads' signals (`rerank`). A user the model has no embedding for (a new
    user's profile) is ranked without them: retriever and sequence order. Without a retriever: the model alone over
    the whole catalogue; `popularity`'s order for users it has no embedding for. `user_side` (one row per profile,
    `ncf.fold_in`): every row's model signals and scores come from its row of `user_side` instead of its user's
    embedding, so new users' profiles are re-ranked too. `retrieved`: the retrieval already done for these
    profiles' users (used when it covers them)."""
    # Who the model scores: users by index (those with an embedding), or every row of the given user side.
    scored, who = (profiles.known(), profiles.users) if user_side is None else (
        np.ones(len(profiles), dtype=bool), np.arange(len(profiles)))
    if retriever is None:
        if popularity is None and not scored.all():
            raise ValueError("without a retriever, only the profiles of users with an embedding can be ranked")

        def model_scores(users: np.ndarray) -> torch.Tensor:
            """The catalogue's scores of `users` (`who`: indices, or rows of the user side)."""
            if user_side is None:
                return model.score_users(torch.as_tensor(users), movie_side=movie_side)
            return model.score_user_side(user_side.take(users), movie_side=movie_side)

        def catalogue(rows: np.ndarray) -> torch.Tensor:
            """The model's scores of the rows' users; popularity for those it has no embedding for."""
            embedded, users = scored[rows], who[rows]
            if embedded.all():
                return model_scores(users)
            scores = torch.as_tensor(popularity, dtype=torch.float32).repeat(len(rows), 1)
            if embedded.any():
                scores[torch.from_numpy(embedded)] = model_scores(users[embedded]).float()
            return scores

        return top_k_unseen(catalogue, np.arange(len(profiles)), profiles.seen(), k)
    signals = model_signals(model, user_side)
    width = reranking.width(k)
    cached = retrieved.rows(profiles.users, width) if retrieved is not None else None
    items, scores = [], []
    for start in range(0, len(profiles), chunk):
        rows = np.arange(start, min(start + chunk, len(profiles)))
        candidates, scored_candidates = ((cached[0][rows], cached[1][rows]) if cached
                                         else retrieve(retriever, profiles.take(rows), width))
        n = min(reranking.n_candidates, candidates.shape[1])
        embedded = scored[rows]
        chunk_items = np.zeros((len(rows), min(k, candidates.shape[1])), dtype=np.int64)
        chunk_scores = np.zeros(chunk_items.shape)
        for part, heads in ((embedded, True), (~embedded, False)):  # with the heads' signals where the model
            if part.any():                                           # scores the row, the retriever's order elsewhere
                part_signals = signals(who[rows][part], candidates[part][:, :n]) if heads else {}
                chunk_items[part], chunk_scores[part] = rerank(candidates[part], scored_candidates[part],
                                                               part_signals, reranking, k)
        items.append(chunk_items)
        scores.append(chunk_scores)
    return np.concatenate(items), np.concatenate(scores)


def top_k(model: NCF, retriever: CandidateRetriever | None, reranking: Reranking, users: np.ndarray,
          seen: SeenItems, k: int, movie_side: MovieSide | None = None, chunk: int = 256,
          retrieved: Retrieved | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`rank_profiles` of known users by index, each profile the ratings `retriever` was built with (`seen`: their
    movies; `own_profiles`): what training's validation and the choice of the re-ranking rank."""
    users = np.asarray(users, dtype=np.int64)
    return rank_profiles(model, retriever, reranking, own_profiles(retriever, users, seen), k, movie_side,
                         chunk=chunk, retrieved=retrieved)
