"""Retrievers, the blend and the sampled/bootstrap metrics on hand-sized cases worked out by hand."""

from __future__ import annotations

from math import log2, sqrt

import numpy as np
import pytest
import scipy.sparse as sp

from ncf.config import load_config
from ncf.data import Ratings
from ncf.evaluation import full_ranking_against, score_ranker
from ncf.metrics import (
    full_ranking_metrics,
    full_ranking_per_user,
    leave_one_out,
    paired_bootstrap,
    sample_negatives,
    sampled_ranking_metrics,
)
from ncf.ranking import blend
from ncf.retrievers import ALS, EASE, RETRIEVERS, ItemKNN, Retriever, load_retriever
from ncf.retrievers.matrices import interaction_matrix, recency_age
from ncf.retrievers.sequence import Sequence
from ncf.user_ratings import SeenItems

pytestmark = pytest.mark.unit

# 4 users x 5 items; item 4 is the most rated (4), then 0 and 2 (3 each), 1 (2), 3 (1).
X = np.array([[1, 1, 0, 0, 1],
              [1, 0, 1, 0, 1],
              [0, 1, 1, 1, 1],
              [1, 0, 1, 0, 1]], dtype=np.float64)


def ease_by_hand(x: np.ndarray, lam: float) -> np.ndarray:
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    b = np.eye(x.shape[1]) - p @ np.diag(1.0 / np.diag(p))
    assert np.allclose(np.diag(b), 0.0)
    return b


def ratings(user, movie, rating, timestamp) -> Ratings:
    return Ratings(np.asarray(user), np.asarray(movie), np.asarray(rating, dtype=float), np.asarray(timestamp))


# ----------------------------------------------------------------------------- EASE


def test_ease_matches_its_closed_form():
    model = EASE(lam=2.0, max_items=None).fit(sp.csr_matrix(X))
    b = ease_by_hand(X, 2.0)
    assert model.weights.dtype == np.float32
    assert np.array_equal(model.items, np.arange(5))
    np.testing.assert_allclose(model.weights, b, atol=1e-5)
    np.testing.assert_allclose(model.score(sp.csr_matrix(X[[2, 0]])), X[[2, 0]] @ b, atol=1e-5)


def test_ease_keeps_only_the_most_rated_items():
    model = EASE(lam=1.0, max_items=3).fit(sp.csr_matrix(X))
    kept = np.array([0, 2, 4])
    assert np.array_equal(model.items, kept)
    assert model.weights.shape == (3, 3) and model.item_matrix_bytes() == 9 * 4
    scores = model.score(sp.csr_matrix(X))
    assert scores.shape == (4, 5)
    assert np.isneginf(scores[:, [1, 3]]).all()
    np.testing.assert_allclose(scores[:, kept], X[:, kept] @ ease_by_hand(X[:, kept], 1.0), atol=1e-5)


def test_ease_scores_a_weighted_profile_and_round_trips(tmp_path):
    profiles = sp.csr_matrix(X * np.array([[0.5], [1.0], [0.25], [2.0]]))
    model = EASE(lam=3.0, max_items=None).fit(sp.csr_matrix(X))
    np.testing.assert_allclose(model.score(profiles[[0]]), profiles[[0]].toarray() @ ease_by_hand(X, 3.0), atol=1e-5)
    loaded = load_retriever(model.save(tmp_path / "ease").parent)
    assert isinstance(loaded, EASE) and isinstance(loaded, Retriever)
    np.testing.assert_array_equal(loaded.score(profiles), model.score(profiles))
    with pytest.raises(ValueError, match="'ease' retriever, not 'als'"):
        ALS.load(tmp_path / "ease")


def test_a_retriever_file_saved_with_the_users_profiles_still_loads(tmp_path):
    """Files written before profiles were an input also hold each fitted user's profile (EASE) or factors (ALS)."""
    ease = EASE(lam=3.0, max_items=None).fit(sp.csr_matrix(X))
    np.savez(tmp_path / "retriever.npz", kind=np.asarray("ease"), **ease.arrays(), profiles_data=np.ones(2))
    np.testing.assert_array_equal(load_retriever(tmp_path).score(sp.csr_matrix(X)), ease.score(sp.csr_matrix(X)))


# ----------------------------------------------------------------------------- ALS


def random_interactions(n_users=30, n_items=20, density=0.25, seed=0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random((n_users, n_items)) < density).astype(np.float32))


def test_als_is_deterministic_given_the_seed(tmp_path):
    x = random_interactions()
    settings = {"factors": 4, "regularization": 0.1, "iterations": 5}
    first, second = ALS(**settings, seed=3).fit(x), ALS(**settings, seed=3).fit(x)
    np.testing.assert_array_equal(first.item_factors, second.item_factors)
    assert not np.allclose(ALS(**settings, seed=4).fit(x).item_factors, first.item_factors)
    profiles = x[[5, 0, 29]]
    scores = first.score(profiles)
    assert scores.shape == (3, 20) and scores.dtype == np.float32
    loaded = load_retriever(first.save(tmp_path).parent)
    assert isinstance(loaded, ALS) and (loaded.factors, loaded.seed) == (4, 3)
    np.testing.assert_array_equal(loaded.score(profiles), scores)


def test_als_solves_a_profiles_factors_as_implicit_recalculates_them():
    """The user factors of a profile are `implicit`'s own least-squares solve against the fixed item factors,
    for plain and for weighted confidences."""
    from implicit.cpu.als import AlternatingLeastSquares

    x = random_interactions()
    als = ALS(factors=4, regularization=0.5, iterations=5, seed=0).fit(x)
    reference = AlternatingLeastSquares(factors=4, regularization=0.5, dtype=np.float32)
    reference.item_factors = als.item_factors
    weighted = x[[3, 7]].multiply(np.array([[1.0], [2.5]])).tocsr()
    for profiles in (x[[3, 7]], weighted):
        expected = np.asarray(reference.recalculate_user([0, 1], profiles))
        np.testing.assert_allclose(als.user_factors(profiles), expected, rtol=1e-3, atol=1e-5)


def test_als_fits_what_users_rated():
    # Two blocks of users who rate two disjoint blocks of items: ALS scores a user's own block higher.
    block = np.kron(np.eye(2), np.ones((10, 5)))
    model = ALS(factors=4, regularization=0.1, iterations=10, seed=0).fit(sp.csr_matrix(block))
    scores = model.score(sp.csr_matrix(block[[0, 15]]))
    assert scores[0, :5].min() > scores[0, 5:].max()
    assert scores[1, 5:].min() > scores[1, :5].max()


# ----------------------------------------------------------------------------- item-kNN


def test_itemknn_ranks_by_its_neighbours_as_computed_by_hand(tmp_path):
    """sim(i, j) = x_i.x_j / (|x_i||x_j| + shrink); each item keeps its 2 most similar; score = profile @ W."""
    shrink = 1.0
    norms = np.sqrt(X.sum(axis=0))  # 1.732, 1.414, 1.732, 1, 2
    sim = (X.T @ X) / (norms[:, None] * norms[None, :] + shrink)
    np.fill_diagonal(sim, 0.0)
    # Item 0 co-occurs 1x with 1, 2x with 2, 0x with 3, 3x with 4: sims 1/(sqrt(6)+1), 2/4, 0, 3/(sqrt(12)+1).
    assert sim[0, [1, 2, 3, 4]] == pytest.approx([1 / (sqrt(6) + 1), 0.5, 0.0, 3 / (sqrt(12) + 1)])
    w = np.zeros_like(sim)
    for i in range(5):  # no ties at the cut in this matrix
        keep = np.argsort(-sim[i])[:2]
        w[i, keep] = sim[i, keep]
    model = ItemKNN(neighbours=2, shrink=shrink).fit(sp.csr_matrix(X))
    np.testing.assert_allclose(model.similar.toarray(), w, rtol=1e-6)
    profile = sp.csr_matrix(np.array([[1.0, 0.0, 0.0, 2.0, 0.0]]))  # liked 0, and 3 twice as much
    scores = model.score(profile)
    np.testing.assert_allclose(scores, profile.toarray() @ w, rtol=1e-6)
    # Item 0 keeps 4 (0.672) and 2 (0.5); item 3 keeps 1 (1/(sqrt(2)+1) = 0.414) and 2 (1/(sqrt(3)+1) = 0.366),
    # not 4 (1/3). So 2 scores 0.5 + 2 x 0.366, 1 scores 2 x 0.414, 4 scores 0.672.
    assert scores[0, [2, 1, 4]] == pytest.approx([0.5 + 2 / (sqrt(3) + 1), 2 / (sqrt(2) + 1), 3 / (sqrt(12) + 1)])
    assert np.argsort(-scores[0], kind="stable")[:3].tolist() == [2, 1, 4]
    movies, shares = model.evidence(profile, 2)  # the two terms of its score, the larger first
    assert movies.tolist() == [3, 0] and shares == pytest.approx([2 / (sqrt(3) + 1), 0.5])
    loaded = load_retriever(model.save(tmp_path).parent)
    assert isinstance(loaded, ItemKNN) and loaded.neighbours == 2
    np.testing.assert_array_equal(loaded.score(profile), scores)


# ----------------------------------------------------------------------------- every retriever


@pytest.mark.parametrize("name", list(RETRIEVERS))
def test_a_profile_never_fitted_gets_scores_of_its_own(name):
    """Two blocks of users who like two disjoint blocks of movies; the retriever is fitted on the first 8 users
    of each block only. A new profile holding 2 movies of a block ranks that block's other movies first, whatever
    is most popular (the other block here; the history model, a likelihood, ranks them level with the movie everyone
    has), and its own movies' evidence explains them."""
    block = np.kron(np.eye(2), np.ones((10, 5)))
    block[:, 5] = 1.0  # movie 5, in the second block, is everyone's: the most popular
    fitted = np.r_[block[:8], block[10:18]]
    retriever = RETRIEVERS[name].from_settings(RETRIEVERS[name].Settings.model_validate(
        {"ease": {"regularization": 1.0, "max_items": None}, "als": {"factors": 4, "regularization": 0.1,
                                                                        "iterations": 10},
         "itemknn": {"neighbours": 4, "shrink": 1.0},
         "history": {"dimension": 8, "epochs": 300, "learning_rate": 0.05, "item_dropout": 0.5, "weight_decay": 0.0,
                     "batch_users": 16}}[name]), seed=0).fit(sp.csr_matrix(fitted))
    profile = sp.csr_matrix(np.array([[1.0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0]]))
    scores = retriever.score(profile)[0]
    assert scores[[2, 3, 4]].min() > scores[6:].max()
    if name != "history":  # a likelihood over the catalogue rightly finds movie 5, in every profile, as likely
        assert scores[[2, 3, 4]].min() > scores[5]
    movies, _ = retriever.evidence(profile, 2)
    assert set(movies.tolist()) <= {0, 1} and len(movies)
# ----------------------------------------------------------------------------- interactions


def test_interaction_matrix_thresholds_and_binarises():
    r = ratings([0, 0, 0, 1], [0, 1, 2, 1], [5.0, 3.0, 4.0, 4.5], [100, 200, 300, 50])
    assert interaction_matrix(r, 3, 4).toarray().tolist() == [[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    liked = interaction_matrix(r, 3, 4, min_rating=4.0)
    assert liked.dtype == np.float32 and sp.isspmatrix_csr(liked)
    assert liked.toarray().tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_recency_weights_by_rank_and_by_days():
    # User 0: movies 0, 1, 2 at t = 100, 200, 300 (rated 5, 3, 4); user 1: movies 3 and 1 in the same second.
    r = ratings([0, 0, 0, 1, 1], [0, 1, 2, 3, 1], [5.0, 3.0, 4.0, 4.0, 4.0], [100, 200, 300, 70, 70])
    weighted = interaction_matrix(r, 2, 4, recency_half_life=1.0).toarray()
    # Ages 2, 1, 0 for user 0; user 1's two ratings tie, so both are the newest.
    np.testing.assert_allclose(weighted, [[0.25, 0.5, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    # Ages are counted among the kept ratings: without movie 1, movie 0 is one step old.
    liked = interaction_matrix(r, 2, 4, min_rating=4.0, recency_half_life=2.0).toarray()
    np.testing.assert_allclose(liked[0], [0.5**0.5, 0.0, 1.0, 0.0])
    days = ratings([0, 0], [0, 1], [4.0, 4.0], [0, 10 * 86_400])
    np.testing.assert_allclose(recency_age(days.user, days.timestamp, "days"), [10.0, 0.0])
    np.testing.assert_allclose(interaction_matrix(days, 1, 2, recency_half_life=5.0, recency_unit="days").toarray(),
                               [[0.25, 1.0]])


def test_profile_weights_by_rating_above_the_offset_times_recency():
    # User 0 rated movies 0, 1, 2 with 5, 3, 4 at t = 100, 200, 300.
    r = ratings([0, 0, 0], [0, 1, 2], [5.0, 3.0, 4.0], [100, 200, 300])
    np.testing.assert_allclose(interaction_matrix(r, 1, 3, min_rating=4.0, rating_offset=2.0).toarray(),
                               [[3.0, 0.0, 2.0]])
    # Ages among the kept ratings are 1 and 0: (5 - 2) * 0.5 and (4 - 2) * 1.
    np.testing.assert_allclose(interaction_matrix(r, 1, 3, min_rating=4.0, recency_half_life=1.0,
                                                  rating_offset=2.0).toarray(), [[1.5, 0.0, 2.0]])
    with pytest.raises(ValueError, match="rating_offset 3.0 leaves kept ratings with a weight <= 0"):
        interaction_matrix(r, 1, 3, rating_offset=3.0)


# ----------------------------------------------------------------------------- blend and re-rank


def test_sequence_counts_what_follows_each_movie_and_scores_the_users_latest():
    # User 0 rates 0, then 1 and 2 in the same second; user 1 rates 2, then 1.
    ratings = Ratings(np.array([0, 0, 0, 1, 1]), np.array([2, 0, 1, 1, 2]), np.array([5.0, 1.0, 3.0, 4.0, 2.0]),
                      np.array([20, 10, 20, 9, 5]))
    sequence = Sequence(window=2, last=2, decay=0.5).fit(ratings, n_movies=4)
    recent = sequence.profiles(ratings, n_users=2, n_movies=4)
    counts = np.zeros((4, 4))
    counts[0, 1] = counts[0, 2] = 1  # every rating counts, whatever its value
    counts[1, 2] = counts[2, 1] = 1  # the same second: both ways
    counts[2, 1] += 1  # user 1
    expected = counts / np.sqrt(np.maximum(counts.sum(axis=1, keepdims=True), 1))
    np.testing.assert_allclose(sequence.transitions.toarray(), expected, rtol=1e-6)
    # Ratings with fewer than 2 newer ones, weight 0.5 ** (how many are newer): user 0's 1 and 2 (none newer; 0 has
    # two newer: left out), user 1's 1, then 2.
    np.testing.assert_allclose(recent.toarray(), [[0, 1, 1, 0], [0, 1, 0.5, 0]])
    np.testing.assert_allclose(sequence.score(recent[[1, 0]]),
                               np.log1p(np.array([[0, 1, 0.5, 0], [0, 1, 1, 0]]) @ expected), rtol=1e-6)
    # Evidence: the terms of a score, strongest first; user 1's score of movie 2 comes from movie 1 alone.
    movies, shares = sequence.evidence(recent[1], movie=2)
    assert movies.tolist() == [1] and shares == pytest.approx([1.0 * expected[1, 2]])
    movies, shares = sequence.evidence(recent[1], movie=3)  # no rating is ever followed by movie 3
    assert len(movies) == len(shares) == 0


@pytest.mark.parametrize("args", [(0, 10, 0.7), (10, 0, 0.7), (10, 10, 0.0), (10, 10, 1.5)])
def test_sequence_settings_out_of_range_are_refused(args):
    with pytest.raises(ValueError, match="sequence"):
        Sequence(*args)


def test_blend_standardises_each_users_candidates():
    z = sqrt(1.5)  # z-scores of (1, 2, 3): -1.2247, 0, 1.2247 (population std sqrt(2/3))
    got = blend(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]), {"rating": np.array([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])},
                {"rating": 0.5})
    np.testing.assert_allclose(got[0], [-z + 0.5 * z, 0.0 - 0.5 * z, z + 0.0])
    # No spread in the retriever's scores: only the NCF's standardised scores count.
    np.testing.assert_allclose(got[1], [-0.5 * z, 0.0, 0.5 * z])
    # Scale-free: multiplying either model's scores changes nothing.
    np.testing.assert_allclose(blend(np.array([[10.0, 20.0, 30.0]]), {"rating": np.array([[300.0, 100.0, 200.0]])},
                                     {"rating": 0.5}), got[:1])


def test_blend_adds_each_weighted_head():
    """Two heads by hand: z(r) + 0.5 z(rating) + 2 z(interaction); a head without a weight counts 0."""
    z = sqrt(1.5)
    retrieved, rating, interaction = np.array([[1.0, 2.0, 3.0]]), np.array([[3.0, 2.0, 1.0]]), np.array([[0, 9, 0.0]])
    # z(interaction) of (0, 9, 0): mean 3, population std sqrt(18) -> (-1/sqrt(2), 2/sqrt(2), -1/sqrt(2))
    zi = np.array([-1.0, 2.0, -1.0]) / sqrt(2)
    got = blend(retrieved, {"rating": rating, "interaction": interaction}, {"rating": 0.5, "interaction": 2.0})
    np.testing.assert_allclose(got[0], np.array([-z, 0, z]) + 0.5 * np.array([z, 0, -z]) + 2.0 * zi)
    np.testing.assert_allclose(blend(retrieved, {"rating": rating}, {}), [[-z, 0.0, z]])


def test_blend_keeps_unscorable_candidates_last():
    got = blend(np.array([[1.0, -np.inf, 3.0]]), {"rating": np.array([[0.0, 100.0, 1.0]])}, {"rating": 10.0})
    assert np.isneginf(got[0, 1]) and np.isfinite(got[0, [0, 2]]).all()
    np.testing.assert_allclose(got[0, [0, 2]], [-1.0 - 10.0 * 1.0, 1.0 + 10.0 * 1.0])


# ----------------------------------------------------------------------------- metrics


def test_full_ranking_per_user_averages_to_full_ranking_metrics():
    top = np.array([[0, 1, 2], [3, 4, 5]])
    users, items = np.array([0, 0, 1]), np.array([1, 7, 5])
    per_user = full_ranking_per_user(top, users, items, 8)
    np.testing.assert_allclose(per_user["full_ndcg_at_3"], [(1 / log2(3)) / (1 + 1 / log2(3)), 0.5])
    summary = full_ranking_metrics(top, users, items, 8)
    assert summary == pytest.approx({n: v.mean() for n, v in per_user.items()} | {"full_coverage": 6 / 8,
                                                                                  "full_users": 2})


def test_full_ranking_against_any_held_out_slice():
    # Scores prefer higher movie indices. User 0 saw movie 0 and holds out 2 (relevant) and 3 (rated 2: not);
    # user 1 saw 1 and holds out 0; user 2 holds out nothing relevant and is not ranked.
    seen = SeenItems(np.array([0, 1]), np.array([0, 1]), 3)
    target = ratings([0, 0, 1, 2], [2, 3, 0, 3], [5.0, 2.0, 4.0, 3.5], [0, 0, 0, 0])
    summary, per_user = full_ranking_against(score_ranker(lambda u: np.tile(np.arange(4.0), (len(u), 1))), seen,
                                             target, 4, k=2, evaluation=load_config().evaluation)
    # Top 2: user 0 [3, 2] (hit at rank 2), user 1 [3, 2] (miss).
    np.testing.assert_allclose(per_user["full_ndcg_at_2"], [1 / log2(3), 0.0])
    np.testing.assert_allclose(per_user["full_hit_rate_at_2"], [1.0, 0.0])
    assert summary["full_coverage"] == 0.5 and summary["full_ndcg_at_2"] == pytest.approx(1 / log2(3) / 2)


def test_leave_one_out_holds_out_each_users_latest():
    mask = leave_one_out(np.array([1, 0, 1, 0, 1]), np.array([5, 9, 7, 3, 7]))
    # User 0: t = 9 (row 1); user 1: t = 7 twice, the later row (4) wins.
    assert mask.tolist() == [False, True, False, False, True]


def test_sampled_metrics_by_hand():
    # 6 items; each user rated 3, so the 3 negatives are forced: the figures do not depend on the draw.
    # user 0 rated 0, 1, 5 (5 held out), negatives 2, 3, 4; user 1 rated 2, 3, 4 (3 held out), negatives 0, 1, 5.
    item_score = np.array([0.0, 0.0, 9.0, 1.0, 7.0, 5.0])
    rated_users, rated_items = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 5, 2, 3, 4])

    def run(score, k):
        return sampled_ranking_metrics(score, np.array([0, 1]), np.array([5, 3]), rated_users, rated_items, 6,
                                       n_negatives=3, k=k, seed=7)

    by_item = lambda users, items: item_score[items]  # noqa: E731
    # User 0: item 5 (5.0) below 9 and 7: rank 2. User 1: item 3 (1.0) below 5 only: rank 1.
    assert run(by_item, 3) == pytest.approx({"sampled_hr_at_3": 1.0, "sampled_ndcg_at_3": (0.5 + 1 / log2(3)) / 2})
    assert run(by_item, 2) == pytest.approx({"sampled_hr_at_2": 0.5, "sampled_ndcg_at_2": (0 + 1 / log2(3)) / 2})
    # Ties count against the model: a constant scorer ranks its item last.
    assert run(lambda users, items: np.zeros(items.shape), 3) == {"sampled_hr_at_3": 0.0, "sampled_ndcg_at_3": 0.0}
    per_user = sampled_ranking_metrics(by_item, np.array([0, 1]), np.array([5, 3]), rated_users, rated_items, 6,
                                       n_negatives=3, k=3, per_user=True)
    np.testing.assert_allclose(per_user["sampled_ndcg_at_3"], [0.5, 1 / log2(3)])


def test_sampled_negatives_are_distinct_unrated_and_seeded():
    rng = np.random.default_rng(1)
    n_items = 300
    rated_users = np.repeat(np.arange(50), 150)
    rated_items = np.concatenate([rng.choice(n_items, 150, replace=False) for _ in range(50)])
    users = np.arange(50)
    negatives = sample_negatives(users, rated_users, rated_items, n_items, seed=5)
    assert negatives.shape == (50, 99)
    for u in users:
        assert len(np.unique(negatives[u])) == 99
        assert not np.isin(negatives[u], rated_items[rated_users == u]).any()
    np.testing.assert_array_equal(negatives, sample_negatives(users, rated_users, rated_items, n_items, seed=5))
    assert not np.array_equal(negatives, sample_negatives(users, rated_users, rated_items, n_items, seed=6))
    with pytest.raises(ValueError, match="too much of the catalogue"):
        sample_negatives(users, rated_users, rated_items, 200)


def test_paired_bootstrap_covers_the_true_difference_and_is_seeded():
    rng = np.random.default_rng(0)
    b = rng.random(800)
    a = b + 0.05 + rng.normal(0.0, 0.1, size=800)  # true mean difference 0.05
    got = paired_bootstrap(a, b, seed=1)
    assert got.low < 0.05 < got.high
    assert got.difference == pytest.approx(np.mean(a - b))
    assert got.low < got.difference < got.high and got.high - got.low < 0.03  # about 4 x 0.1 / sqrt(800)
    assert paired_bootstrap(a, b, seed=1) == got
    assert paired_bootstrap(a, b, seed=2) != got
    # Pairing: a constant shift has no spread at all.
    assert paired_bootstrap(b + 0.1, b) == pytest.approx((0.1, 0.1, 0.1))
