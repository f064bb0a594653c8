"""Folding users' ratings into the frozen model (`ncf.fold_in`), and ranking and explaining from the folded-in
user sides (`ncf.ranking.rank_profiles(..., user_side=)`, `Recommender.rank_profiles(..., fold_in=True)`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncf.config import load_config
from ncf.data import MovieLens, Ratings
from ncf.fold_in import fold_in, start_side
from ncf.metrics import rmse
from ncf.model import NCF, forward_batched
from ncf.ranking import fit_retriever
from ncf.recommender import Recommender
from ncf.training.loop import train_loop
from ncf.training.reporting import LocalReporter
from ncf.training.validation import Validation
from ncf.user_ratings import NEW_USER, Profiles

pytestmark = pytest.mark.unit


def trained(movielens: MovieLens, *overrides: str) -> tuple[NCF, Recommender]:
    """The tiny model trained on train + validation (no early stop), and its recommender: EASE re-ranked by the
    rating head."""
    config = load_config(["train.max_epochs=30", "train.patience=30", "train.refit=false", "train.batch_size=256",
                          "retrieval.n_candidates=30", "retrieval.rating_weight=2.0", *overrides], preset="tiny")
    result = train_loop(config, movielens, LocalReporter(verbose=False), Validation(config, movielens, rank=0))
    history = movielens.splits.train_and_validation()
    retriever = fit_retriever(config.retrieval, history, movielens.n_users, movielens.n_movies)
    return result.model.eval(), Recommender.from_training(result.model, config, movielens, retriever)


@pytest.fixture(scope="module")
def with_bias(tiny_movielens: MovieLens) -> tuple[NCF, Recommender]:
    return trained(tiny_movielens, "model.use_bias=true")


def rows(*profiles: Profiles) -> Profiles:
    """Single-row profiles stacked, in order."""
    ratings = Ratings(*(np.concatenate([getattr(p.ratings, f) + (i if f == "user" else 0)
                                        for i, p in enumerate(profiles)]) for f in Ratings.DTYPES))
    return Profiles(ratings, np.r_[0, np.cumsum([len(p.ratings) for p in profiles])],
                    np.concatenate([p.users for p in profiles]))


def test_fold_in_changes_nothing_in_the_model(with_bias):
    model, recommender = with_bias
    before = {name: value.clone() for name, value in model.state_dict().items()}
    side = fold_in(model, recommender.profiles_of(np.arange(10)))
    assert not side.embedding.requires_grad and side.embedding.grad_fn is None and side.bias.grad_fn is None
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_a_profile_without_ratings_keeps_its_start_and_a_new_user_starts_at_the_mean_user(with_bias):
    model, recommender = with_bias
    rated = recommender.ratings_of(3)
    profiles = rows(Profiles.one(rated.movie, rated.rating, user=3), Profiles.one([], [], user=3),
                    Profiles.one([], []), Profiles.one(rated.movie, rated.rating))
    side, start = fold_in(model, profiles), start_side(model, profiles)
    assert torch.equal(start.embedding[1], model.user_embedding.weight[3])
    assert torch.allclose(start.embedding[2], model.user_embedding.weight.mean(0))
    assert torch.allclose(start.bias[2], model.user_bias.weight.mean())
    for row in (1, 2):
        assert torch.equal(side.embedding[row], start.embedding[row]) and side.bias[row] == start.bias[row]
    for row in (0, 3):
        assert not torch.equal(side.embedding[row], start.embedding[row])


def test_rows_are_folded_in_each_on_its_own(with_bias):
    model, recommender = with_bias
    together = fold_in(model, recommender.profiles_of(np.array([4, 9])))
    for i, user in enumerate((4, 9)):
        alone = fold_in(model, recommender.profiles_of(np.array([user])))
        assert torch.allclose(together.embedding[i], alone.embedding[0], atol=1e-6)


def test_a_known_users_own_ratings_keep_their_predictions_and_a_new_user_learns_them(with_bias, tiny_movielens):
    """Folding in the ratings a user was trained on barely moves the predictions of their embedding (it already
    fits them); the same ratings as a new user's fit them far better than the mean user does."""
    model, _ = with_bias
    users = np.arange(20)
    profiles = Profiles.of_ratings(tiny_movielens.splits.train, tiny_movielens.n_users).take(users)
    rated = profiles.ratings

    def predicted(side) -> np.ndarray:
        return forward_batched(model, torch.from_numpy(rated.user), torch.from_numpy(rated.movie),
                               user_side=side).rating.numpy()

    embedding = forward_batched(model, torch.from_numpy(users[rated.user]), torch.from_numpy(rated.movie))
    known = predicted(fold_in(model, profiles))
    assert np.abs(known - embedding.rating.numpy()).mean() < 0.15
    assert rmse(rated.rating, known) <= rmse(rated.rating, embedding.rating.numpy())
    as_new = Profiles(profiles.ratings, profiles.indptr, np.full(len(users), NEW_USER))
    start, new = predicted(start_side(model, as_new)), predicted(fold_in(model, as_new))
    assert rmse(rated.rating, new) < rmse(rated.rating, start) - 0.05


def test_a_model_without_a_rating_head_folds_in_which_movies_were_rated(tiny_movielens: MovieLens):
    model, recommender = trained(tiny_movielens, "model.objective=implicit", "train.monitor=val_full_ndcg_at_10",
                                 "retrieval.interaction_weight=2.0")
    rated = recommender.ratings_of(5)
    profile = Profiles.one(rated.movie, rated.rating)
    start, side = start_side(model, profile), fold_in(model, profile)

    def rated_above_the_rest(side) -> float:
        """How far the rated movies' logits stand above the catalogue's, on average."""
        scores = model.score_user_side(side)[0]
        return float(scores[torch.from_numpy(rated.movie)].mean() - scores.mean())

    assert rated_above_the_rest(side) > rated_above_the_rest(start) + 0.1


def test_ranking_from_a_folded_in_new_user(with_bias):
    """A new user's profile is re-ranked by the heads from its folded-in side (not the retriever's order), never
    offered its own movies; a known user's looked-up side ranks exactly as the user's embedding does."""
    model, recommender = with_bias
    rated = recommender.ratings_of(7)
    new = Profiles.one(rated.movie, rated.rating, rated.timestamp)
    retriever_order, _ = recommender.rank_profiles(new, 10)
    side = recommender.fold_in(new)
    top, scores = recommender.rank_profiles(new, 10, user_side=side)
    np.testing.assert_array_equal(recommender.rank_profiles(new, 10, fold_in=True)[0], top)
    assert top.tolist() != retriever_order.tolist()
    assert not np.isin(top, rated.movie).any() and (np.diff(scores[0]) <= 0).all()
    known = recommender.profiles_of(np.arange(12))
    looked_up = model.user_side(torch.arange(12))
    for got, expected in zip(recommender.rank_profiles(known, 10, user_side=looked_up), recommender.top_k(
            np.arange(12), 10), strict=True):
        np.testing.assert_array_equal(got, expected)
    explained = recommender.explain_profile(new, top[0], side)
    assert set(explained) >= {"rating", "strength", "user_weight", "movie_weight"}
    pairs = model.forward_user_side(side, torch.from_numpy(top[0]), torch.zeros(10, dtype=torch.int64))
    np.testing.assert_allclose(explained["rating"], pairs.rating.detach().numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="folded-in"):
        recommender.explain_profile(new, top[0], None)


def test_the_model_alone_ranks_the_catalogue_from_a_user_side(with_bias, tiny_movielens: MovieLens):
    """Without a retriever, rows with a user side are scored by the model from it: a new user included."""
    model, recommender = with_bias
    alone = Recommender(model, recommender.config, tiny_movielens.ids, tiny_movielens.movies, recommender.history,
                        recommender.reranking)
    rated = recommender.ratings_of(2)
    profiles = rows(recommender.profiles_of(np.array([2])), Profiles.one(rated.movie, rated.rating))
    side = alone.fold_in(profiles)
    top, _ = alone.rank_profiles(profiles, 10, user_side=side)
    with torch.no_grad():
        scores = model.score_user_side(side)
    scores[:, torch.from_numpy(rated.movie)] = float("-inf")
    np.testing.assert_array_equal(top, torch.topk(scores, 10).indices.numpy())
    assert alone.rank_profiles(profiles.take([1]), 10)[0].tolist() != top[1:].tolist()  # popularity without it
