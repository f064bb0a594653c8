"""Retrieval then re-ranking (what every recommender serves), negative sampling and the three objectives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncf.config import Config, RetrievalConfig, load_config
from ncf.data import MovieLens, Ratings
from ncf.evaluation import full_ranking_against
from ncf.ranking import (
    CandidateRetriever,
    Reranking,
    Retrieved,
    blend,
    blended_pairs,
    fit_retriever,
    model_signals,
    rerank,
    top_k,
    top_k_unseen,
)
from ncf.reranking_search import choose_reranking
from ncf.retrievers import ALS, EASE, RETRIEVERS
from ncf.retrievers.matrices import interaction_matrix
from ncf.retrievers.sequence import Sequence
from ncf.training.batches import rated_keys, sample_unrated
from ncf.training.loop import train_loop
from ncf.training.reporting import LocalReporter
from ncf.training.state import build_model
from ncf.training.validation import Validation
from ncf.user_ratings import Profiles, SeenItems

pytestmark = pytest.mark.unit



def small(tiny_config: Config, *overrides: str) -> Config:
    return load_config([f"data.dir={tiny_config.data.dir}", *overrides], preset="tiny")


def retrieval_keeping(min_rating: float) -> RetrievalConfig:
    """The default retrieval settings, keeping ratings >= `min_rating`, each profile entry 1 (no recency or
    rating weights)."""
    return load_config([]).retrieval.model_copy(update={"min_rating": min_rating, "recency_half_life": None,
                                                        "profile_rating_offset": None})


@pytest.fixture(scope="module")
def model_and_retriever(tiny_config: Config, tiny_movielens: MovieLens):
    config = small(tiny_config)
    torch.manual_seed(0)
    model = build_model(config, tiny_movielens).eval()
    train = tiny_movielens.splits.train
    retriever = fit_retriever(config.retrieval, train, tiny_movielens.n_users, tiny_movielens.n_movies)
    return config, model, retriever


def test_rerank_by_hand():
    """Weight 0 keeps the retriever's order; the first n are blended, the rest follow in the retriever's order."""
    candidates = np.array([[10, 11, 12, 13]])
    retrieved = np.array([[4.0, 3.0, 2.0, 1.0]])
    signals = {"rating": np.array([[1.0, 2.0, 3.0, 9.0]])}
    items, _ = rerank(candidates, retrieved, signals, Reranking(3, {"rating": 0.0}), k=4)
    np.testing.assert_array_equal(items, [[10, 11, 12, 13]])
    items, scores = rerank(candidates, retrieved, signals, Reranking(3, {"rating": 100.0}), k=4)
    # Among the first 3 the NCF's order wins (12, 11, 10); 13 stays 4th whatever its NCF score.
    np.testing.assert_array_equal(items, [[12, 11, 10, 13]])
    assert (np.diff(scores, axis=1) < 0).all()
    expected = blend(retrieved[:, :3], {"rating": signals["rating"][:, :3]}, {"rating": 100.0})[0, [2, 1, 0]]
    np.testing.assert_allclose(scores[0, :3], expected)


def test_top_k_never_returns_a_seen_movie_and_follows_the_blend(model_and_retriever, tiny_movielens):
    config, model, retriever = model_and_retriever
    train = tiny_movielens.splits.train
    seen = SeenItems(train.user, train.movie, tiny_movielens.n_users)
    users = np.arange(tiny_movielens.n_users)
    reranking = Reranking(30, {"rating": 0.5})
    items, scores = top_k(model, retriever, reranking, users, seen, 10, chunk=7)
    assert items.shape == scores.shape == (len(users), 10)
    assert all(np.intersect1d(items[u], seen.of(u)).size == 0 for u in users)
    assert (np.diff(scores, axis=1) <= 0).all()
    # The same as re-ranking the retriever's own top 30 by hand.
    candidates, retrieved = top_k_unseen(retriever.score, users, seen, 30)
    blended = blend(retrieved, model_signals(model)(users, candidates), reranking.weights)
    by_hand = np.take_along_axis(candidates, np.argsort(-blended, axis=1, kind="stable")[:, :10], axis=1)
    np.testing.assert_array_equal(items, by_hand)
    # Retrieval done once beforehand (validation, every epoch) gives the same; for other users or another
    # width it is not used.
    retrieved = Retrieved(retriever, users, seen, 30)
    np.testing.assert_array_equal(top_k(model, retriever, reranking, users, seen, 10, retrieved=retrieved)[0], items)
    assert retrieved.rows(users[1:], 30) is None and retrieved.rows(users, 20) is None
    narrow = Reranking(20, {"rating": 0.5})
    np.testing.assert_array_equal(top_k(model, retriever, narrow, users, seen, 10, retrieved=retrieved)[0],
                                  top_k(model, retriever, narrow, users, seen, 10)[0])
    # Scoring given pairs the same way gives the same order (the sampled protocol's scores).
    pairs = blended_pairs(model, retriever, reranking, users, candidates)
    np.testing.assert_allclose(pairs, blended, rtol=1e-5, atol=1e-6)


def test_without_a_retriever_the_model_ranks_the_catalogue(model_and_retriever, tiny_movielens):
    _, model, _ = model_and_retriever
    train = tiny_movielens.splits.train
    seen = SeenItems(train.user, train.movie, tiny_movielens.n_users)
    users = np.array([0, 5, 9])
    items, _ = top_k(model, None, Reranking(0), users, seen, 5)
    expected, _ = top_k_unseen(lambda u: model.score_users(torch.as_tensor(u)), users, seen, 5)
    np.testing.assert_array_equal(items, expected)


def test_users_without_a_profile_get_the_most_rated_movies():
    ratings = Ratings(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 2, 1]), np.array([5.0, 4.0, 4.5, 5.0, 2.0]),
                      np.zeros(5, dtype=np.int64))
    ease = EASE(lam=1.0, max_items=None).fit(interaction_matrix(ratings, 3, 4, min_rating=4.0))
    retriever = CandidateRetriever(ease, retrieval_keeping(4.0), ratings, 3, 4)
    scores = retriever.score(np.array([2]))  # user 2 rated nothing >= 4
    np.testing.assert_allclose(scores[0], np.log1p([1.0, 3.0, 1.0, 0.0]))  # movie 1 is rated most


@pytest.mark.parametrize("name", list(RETRIEVERS))
def test_the_ratings_of_a_user_never_fitted_are_scored_as_a_profile(tiny_config: Config, tiny_movielens: MovieLens,
                                                                   name: str):
    """The retrieval stage (retriever and sequence signal) fitted without user u scores u's ratings, passed as a
    new profile, as it scores a fitted user: from them, not the most rated movies; a fitted user's ratings passed
    the same way score exactly as the user does."""
    train = tiny_movielens.splits.train
    n_users, n_movies = tiny_movielens.n_users, tiny_movielens.n_movies
    newcomer = int(np.bincount(train.user).argmax())
    others = train.take(np.flatnonzero(train.user != newcomer))
    config = small(tiny_config, f"retrieval.retriever={name}", "retrieval.sequence.weight=0.5")
    stage = fit_retriever(config.retrieval, others, n_users, n_movies)
    theirs = train.take(np.flatnonzero(train.user == newcomer))
    as_new = Ratings(np.zeros(len(theirs), np.int64), theirs.movie, theirs.rating, theirs.timestamp)
    scores = stage.score_profiles(Profiles.of_ratings(as_new, 1))[0]
    assert stage.score(np.array([newcomer]))[0] == pytest.approx(
        blend(stage.fallback[None], {"s": np.zeros((1, n_movies))}, {"s": 0.5})[0])  # fitted without any rating
    popular = np.argsort(-stage.fallback, kind="stable")
    assert not np.array_equal(np.argsort(-scores, kind="stable")[:10], popular[:10])
    fitted = others.user[0]
    again = others.take(np.flatnonzero(others.user == fitted))
    again = Ratings(np.zeros(len(again), np.int64), again.movie, again.rating, again.timestamp)
    np.testing.assert_allclose(stage.score_profiles(Profiles.of_ratings(again, 1)), stage.score(np.array([fitted])),
                               rtol=1e-5, atol=1e-6)


def test_the_sequence_signal_is_blended_into_the_retrievers_scores(tiny_config: Config, tiny_movielens: MovieLens):
    train = tiny_movielens.splits.train
    n_users, n_movies = tiny_movielens.n_users, tiny_movielens.n_movies
    plain = fit_retriever(small(tiny_config).retrieval, train, n_users, n_movies)
    config = small(tiny_config, "retrieval.sequence.weight=0.5", "retrieval.sequence.window=3",
                   "retrieval.sequence.last=4", "retrieval.sequence.decay=0.8")
    blended = fit_retriever(config.retrieval, train, n_users, n_movies)
    users = np.arange(n_users)
    sequence = Sequence(3, 4, 0.8).fit(train, n_movies)
    recent = sequence.score(sequence.profiles(train, n_users, n_movies))
    np.testing.assert_allclose(blended.score(users), blend(plain.score(users), {"s": recent}, {"s": 0.5}),
                               rtol=1e-5, atol=1e-5)
    assert plain.sequence is None


def test_ease_evidence_is_the_terms_of_its_score():
    ratings = Ratings(np.array([0, 0, 0, 1, 1, 2, 2, 2]), np.array([0, 1, 2, 0, 3, 1, 2, 3]),
                      np.full(8, 5.0), np.zeros(8, dtype=np.int64))
    x = interaction_matrix(ratings, 3, 4, min_rating=4.0)
    retriever = CandidateRetriever(EASE(lam=0.5, max_items=None).fit(x), retrieval_keeping(4.0), ratings, 3, 4)
    movies, shares = retriever.evidence(retriever.known.take([1]), movie=1)
    score = retriever.score(np.array([1]))[0, 1]
    positive = sum(w for w in retriever.retriever.weights[[0, 3], 1] if w > 0)
    assert set(movies) <= {0, 3} and shares.sum() == pytest.approx(positive)
    assert score == pytest.approx(retriever.retriever.weights[0, 1] + retriever.retriever.weights[3, 1])
    assert (np.diff(shares) <= 0).all()


def test_als_evidence_is_the_users_liked_movies_closest_to_the_movie():
    # User 0 liked movies 0, 1 and 2 and disliked 3 (rated 2); the others make the factors.
    ratings = Ratings(np.array([0, 0, 0, 0, 1, 1, 1, 2, 2]), np.array([0, 1, 2, 3, 0, 1, 4, 2, 4]),
                      np.array([5.0, 4.0, 4.5, 2.0, 5.0, 5.0, 5.0, 4.0, 4.0]), np.zeros(9, dtype=np.int64))
    als = ALS(factors=3, regularization=0.1, iterations=10, seed=0).fit(interaction_matrix(ratings, 3, 5, 4.0))
    retriever = CandidateRetriever(als, retrieval_keeping(4.0), ratings, 3, 5)
    movies, shares = retriever.evidence(retriever.known.take([0]), movie=4)
    assert set(movies) <= {0, 1, 2}  # only what the profile holds: never the disliked movie, nor movie 4 itself
    unit = als.item_factors / np.linalg.norm(als.item_factors, axis=1, keepdims=True)
    np.testing.assert_allclose(shares, unit[movies] @ unit[4], rtol=1e-5)
    assert len(movies) and (shares > 0).all() and (np.diff(shares) <= 0).all()
    assert 0 not in retriever.evidence(retriever.known.take([0]), movie=0)[0]  # a movie is not its own evidence


def test_choose_reranking_picks_the_best_grid_point_on_validation(model_and_retriever, tiny_movielens):
    config, model, retriever = model_and_retriever
    train, validation = tiny_movielens.splits.train, tiny_movielens.splits.validation
    seen = SeenItems(train.user, train.movie, tiny_movielens.n_users)
    cfg = config.retrieval.model_copy(update={"n_candidates_grid": [5, 20], "rating_weight_grid": [0.0, 1.0, 4.0]})
    chosen, metrics, table = choose_reranking(model, retriever, seen, validation, tiny_movielens.n_movies, cfg,
                                              evaluation=config.evaluation)
    assert len(table) == 6 and {row["n_candidates"] for row in table} == {5, 20}
    for row in table:  # each grid point's figure is what ranking with it gives
        reranking = Reranking(row["n_candidates"], {"rating": row["rating_weight"]})
        got, _ = full_ranking_against(lambda u, s, k, r=reranking: top_k(model, retriever, r, u, s, k)[0], seen,
                                      validation, tiny_movielens.n_movies, evaluation=config.evaluation)
        assert got["full_ndcg_at_10"] == pytest.approx(row["full_ndcg_at_10"])
    best = max(row["full_ndcg_at_10"] for row in table)
    assert metrics["full_ndcg_at_10"] == pytest.approx(best)
    assert (chosen.n_candidates, chosen.weights["rating"]) in {(r["n_candidates"], r["rating_weight"]) for r in table
                                                               if r["full_ndcg_at_10"] == best}


def test_sampled_unrated_movies_are_never_rated():
    rng = np.random.default_rng(0)
    n_users, n_movies = 30, 25
    users = np.repeat(np.arange(n_users), 20)
    movies = np.concatenate([rng.choice(n_movies, 20, replace=False) for _ in range(n_users)])
    ratings = Ratings(users, movies, np.full(len(users), 4.0), np.zeros(len(users), dtype=np.int64))
    keys = rated_keys(ratings, n_movies)
    negatives = sample_unrated(users, keys, n_movies, 4, np.random.default_rng(1))
    assert len(negatives) == 4 * len(users)
    owner = np.repeat(users, 4)
    assert not np.isin(owner * n_movies + negatives, keys).any()
    assert len(np.unique(owner * n_movies + negatives)) > 100  # spread over each user's 5 unrated movies
    again = sample_unrated(users, keys, n_movies, 4, np.random.default_rng(1))
    np.testing.assert_array_equal(negatives, again)  # seeded


@pytest.mark.parametrize("objective,architecture", [("rating", "mlp"), ("implicit", "gmf"), ("implicit", "mlp"),
                                                    ("implicit", "neumf"), ("joint", "neumf")])
def test_each_objectives_loss_falls(tiny_config, tiny_movielens, objective, architecture):
    config = small(tiny_config, f"model.objective={objective}", f"model.architecture={architecture}",
                   "train.monitor=val_full_ndcg_at_10", "train.max_epochs=4", "train.patience=10",
                   "train.refit=false", "train.learning_rate=0.005")
    result = train_loop(config, tiny_movielens, LocalReporter(verbose=False),
                        Validation(config, tiny_movielens, rank=0))
    losses = [m["train_loss"] for m in result.history]
    assert losses[-1] < losses[0], losses
    assert all(0 <= m["val_full_ndcg_at_10"] <= 1 for m in result.history)
    assert ("val_rmse" in result.history[0]) == (objective != "implicit")
