"""Users' ratings are an input: `Recommender.rank_profiles` ranks any profile, a known user's stored ratings or
ratings the model never saw, through the one ranking path (`ncf.ranking.rank_profiles`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncf.config import load_config
from ncf.data import MovieLens, Ratings
from ncf.ranking import fit_retriever
from ncf.recommender import Recommender
from ncf.training.state import build_model
from ncf.user_ratings import NEW_USER, Profiles, SeenItems

pytestmark = pytest.mark.unit



def recommender_with(movielens: MovieLens, *overrides: str) -> Recommender:
    """An untrained model (the ranking plumbing does not need a good one) with the configured retriever fitted on
    the ratings the recommender keeps."""
    config = load_config(["retrieval.n_candidates=20", "retrieval.rating_weight=0.5", *overrides], preset="tiny")
    torch.manual_seed(0)
    model = build_model(config, movielens)
    history = movielens.splits.train_and_validation()
    retriever = fit_retriever(config.retrieval, history, movielens.n_users, movielens.n_movies)
    return Recommender.from_training(model, config, movielens, retriever)


@pytest.fixture(scope="module")
def recommender(tiny_movielens: MovieLens) -> Recommender:
    """EASE re-ranked by the NCF, with the sequence signal: every part of a profile is read."""
    return recommender_with(tiny_movielens, "retrieval.sequence.weight=0.5")


def a_new_profile(recommender: Recommender, user: int) -> Profiles:
    """A profile the model never saw: the ratings of known user `user`, moved by one day, as a new user's."""
    rated = recommender.ratings_of(user)
    return Profiles.one(rated.movie, rated.rating, rated.timestamp + 86_400)


def test_profiles_gather_known_users_and_their_own_movies():
    ratings = Ratings(np.array([2, 0, 2, 1, 0]), np.array([5, 6, 7, 8, 9]), np.array([4.0, 3.0, 5.0, 2.0, 1.0]),
                      np.arange(5))
    every = Profiles.of_ratings(ratings, 4)
    assert every.counts().tolist() == [2, 1, 2, 0] and every.known().all()
    some = every.take(np.array([2, 3, 0]))
    assert some.users.tolist() == [2, 3, 0] and some.counts().tolist() == [2, 0, 2]
    assert some.of(0).movie.tolist() == [5, 7] and some.of(2).rating.tolist() == [3.0, 1.0]
    assert some.ratings.user.tolist() == [0, 0, 2, 2]  # rows of the batch, not user indices
    assert [some.seen().of(row).tolist() for row in range(3)] == [[5, 7], [], [6, 9]]
    seen = SeenItems(ratings.user, ratings.movie, 4)
    from_seen = Profiles.of_seen(seen, np.array([2, 3, 0]))
    assert [from_seen.seen().of(row).tolist() for row in range(3)] == [[5, 7], [], [6, 9]]
    one = Profiles.one([4, 1], [5.0, 3.5])
    assert len(one) == 1 and one.users.tolist() == [NEW_USER] and one.of(0).timestamp.tolist() == [0, 1]


def test_a_profile_never_seen_in_training_gets_a_personalised_list(recommender: Recommender):
    """Ranked from its own ratings: not the popularity fallback, its own movies left out, in the retrieval
    stage's order for those ratings (no embedding to re-rank with: no fold-in of new users)."""
    k = 10
    liked, other = a_new_profile(recommender, 3), a_new_profile(recommender, 7)
    top, scores = recommender.rank_profiles(liked, k)
    assert top.shape == scores.shape == (1, k) and np.isfinite(scores).all() and (np.diff(scores[0]) <= 0).all()
    assert not np.isin(top[0], liked.of(0).movie).any()
    popular, _ = recommender.rank_profiles(Profiles.one([], []), k)
    assert set(top[0].tolist()) != set(popular[0].tolist())
    assert set(top[0].tolist()) != set(recommender.rank_profiles(other, k)[0][0].tolist())  # follows the profile
    # The retrieval stage's best movies for these ratings, its own left out.
    retrieved = recommender.candidates.score_profiles(liked)[0]
    retrieved[liked.of(0).movie] = -np.inf
    assert (np.diff(retrieved[top[0]]) <= 0).all() and retrieved[top[0]].min() >= np.delete(retrieved, top[0]).max()
    # In raw ids, as an API caller gives them.
    rated = recommender.ratings_of(3)
    by_ids = recommender.profile(recommender.ids.movie_ids[rated.movie], rated.rating, rated.timestamp + 86_400)
    np.testing.assert_array_equal(recommender.rank_profiles(by_ids, k)[0], top)


def test_a_known_users_profile_call_equals_their_top_k(recommender: Recommender):
    """A known user's ratings given as a profile, in any order, with the user's index: the list they are served."""
    users = np.arange(len(recommender.ids.user_ids))
    expected_top, expected_scores = recommender.top_k(users, 10)
    for user in (0, 3, 9):
        rated = recommender.ratings_of(user)
        shuffled = np.random.default_rng(user).permutation(len(rated))
        profile = Profiles.one(rated.movie[shuffled], rated.rating[shuffled], rated.timestamp[shuffled], user=user)
        top, scores = recommender.rank_profiles(profile, 10)
        np.testing.assert_array_equal(top[0], expected_top[user])
        np.testing.assert_allclose(scores[0], expected_scores[user], rtol=1e-5, atol=1e-5)  # float32 sums
    table = recommender.recommend(recommender.ids.user_ids[[3]], k=10)  # the pyfunc's answer
    assert table["movie_id"].tolist() == recommender.ids.movie_ids[expected_top[3]].tolist()


def test_known_and_new_profiles_rank_alike_alone_or_together(recommender: Recommender):
    """One batch may mix users the model knows (re-ranked) and new ones (retrieval order): each row as alone."""
    new = a_new_profile(recommender, 5)
    known = recommender.profiles_of([1, 2])
    mixed = Profiles(Ratings(np.r_[known.ratings.user, np.full(len(new.ratings), 2)],
                             *(np.r_[getattr(known.ratings, f), getattr(new.ratings, f)]
                               for f in ("movie", "rating", "timestamp"))),
                     np.r_[known.indptr, known.indptr[-1] + new.indptr[1:]], np.r_[known.users, new.users])
    top, _ = recommender.rank_profiles(mixed, 10)
    np.testing.assert_array_equal(top[:2], recommender.top_k(np.array([1, 2]), 10)[0])
    np.testing.assert_array_equal(top[2], recommender.rank_profiles(new, 10)[0][0])
    # The same ratings with the user's embedding are re-ranked by the NCF: another order.
    as_known = Profiles(new.ratings, new.indptr, np.array([5]))
    assert recommender.rank_profiles(as_known, 10)[0][0].tolist() != top[2].tolist()


def test_an_empty_profile_gets_the_most_rated_movies(recommender: Recommender, tiny_movielens: MovieLens):
    plain = recommender_with(tiny_movielens, "retrieval.retriever=none")
    for rec in (recommender, plain):
        top, _ = rec.rank_profiles(Profiles.one([], []), 10)
        counts = rec.popularity[top[0]]
        assert (np.diff(counts) <= 0).all() and counts.min() >= np.delete(rec.popularity, top[0]).max()
    # Without a retriever a new user's ratings have nothing to be scored by: the most rated movies but theirs.
    new = a_new_profile(plain, 3)
    top, _ = plain.rank_profiles(new, 10)
    assert not np.isin(top[0], new.of(0).movie).any()
    rest = np.setdiff1d(np.arange(len(plain.popularity)), np.r_[top[0], new.of(0).movie])
    assert plain.popularity[top[0]].min() >= plain.popularity[rest].max()


def test_evidence_reads_the_profile(recommender: Recommender):
    """/explain's evidence from a profile: a known user's stored ratings or the same ratings as a new profile."""
    user = 3
    movie = int(recommender.top_k(np.array([user]), 1)[0][0, 0])
    stored, new = recommender.profiles_of([user]), a_new_profile(recommender, user)
    for evidence in (recommender.retrieval_evidence, recommender.sequence_evidence):
        movies, shares = evidence(stored, movie)
        again = evidence(new, movie)
        assert len(movies) and np.isin(movies, stored.of(0).movie).all() and (np.diff(shares) <= 0).all()
        np.testing.assert_array_equal(again[0], movies)
        np.testing.assert_allclose(again[1], shares, rtol=1e-6)


def test_latest_keeps_each_rows_most_recent_ratings_oldest_first():
    ratings = Ratings(np.array([0, 0, 0, 1, 2, 2]), np.array([5, 6, 7, 8, 9, 10]), np.arange(6.0),
                      np.array([30, 10, 20, 5, 7, 7]))
    profiles = Profiles(ratings, np.array([0, 3, 4, 6]), np.array([4, NEW_USER, 1]))
    latest = profiles.latest(2)
    assert latest.counts().tolist() == [2, 1, 2] and latest.users.tolist() == [4, NEW_USER, 1]
    assert latest.ratings.movie.tolist() == [7, 5, 8, 9, 10]  # row 0: times 20, 30; row 2: equal times, as given
    assert latest.ratings.user.tolist() == [0, 0, 1, 2, 2]
    assert profiles.latest(3) is profiles
