"""The history model (`ncf.retrievers.history`): its training, its fast scorer against its network, its attention
and its evidence, on hand-sized data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ncf.config import load_config
from ncf.data import Ratings
from ncf.retrievers import History, load_retriever
from ncf.retrievers.base import RatedEntries
from ncf.retrievers.history import _Network, _Rows
from ncf.retrievers.matrices import fit_on_ratings, rated_entries, user_profiles

pytestmark = pytest.mark.unit


def two_tastes(n_users: int = 40, seed: int = 0) -> Ratings:
    """Half the users like movies 0-9, half 10-19, each user 6 of them; everyone also rated movie 20 low, latest."""
    rng = np.random.default_rng(seed)
    users, movies, ratings, times = [], [], [], []
    for user in range(n_users):
        block = 0 if user < n_users // 2 else 10
        liked = block + rng.choice(10, size=6, replace=False)
        users += [user] * 7
        movies += [*liked.tolist(), 20]
        ratings += [5.0] * 3 + [4.0] * 3 + [1.0]
        times += list(range(7))
    return Ratings(np.asarray(users), np.asarray(movies), np.asarray(ratings, dtype=np.float64), np.asarray(times))


def fitted(epochs: int = 150, **settings) -> History:
    ratings = two_tastes()
    return History(dimension=8, epochs=epochs, learning_rate=0.03, batch_users=16, **settings).fit_entries(
        rated_entries(ratings, 40, 21, min_rating=4.0))


def test_the_loss_falls_and_a_profile_ranks_its_taste_first():
    """Trained on the two tastes, the multinomial likelihood of the users' profiles rose far above that of one
    step's network, and a new profile with two movies of the first block ranks that block's other movies above
    the second block's."""
    entries = rated_entries(two_tastes(), 40, 21, min_rating=4.0)
    before = History(dimension=8, epochs=1, learning_rate=0.03, batch_users=16).fit_entries(entries)
    after = fitted()
    profile = sp.csr_matrix(([1.0, 1.0], [0, 1], [0, 2]), shape=(1, 21))
    scores = after.score(profile)[0]
    assert scores[2:10].min() > scores[10:20].max()
    assert np.isneginf(after.score(profile)[0, 20])  # rated 1 by everyone: never a liked movie, never scored

    rows = _Rows(entries.matrix[:, after.items].tocsr(), entries.rating, entries.age)
    profile_rows, buckets, ages = rows.dense(np.arange(40))
    losses = []
    for model in (before, after):
        network = network_of(model)
        with torch.no_grad():
            logits = network(profile_rows, buckets, ages)
        losses.append(float(-(torch.log_softmax(logits, 1) * profile_rows).sum(1).mean()))
    assert losses[1] < losses[0] - 1.0


def network_of(model: History) -> _Network:
    network = _Network(len(model.items), model.dimension)
    with torch.no_grad():
        for name in ("inputs", "outputs", "bias", "rating_logit"):
            getattr(network, name).copy_(torch.from_numpy(getattr(model, name)))
        network.age_slope.fill_(model.age_slope)
    return network


def test_the_fast_scorer_equals_the_network():
    """`score` (numpy, sparse profiles weighed by `weigh`) gives the training network's logits for the same
    ratings and ages, with no movie left out."""
    model = fitted(epochs=20)
    ratings = Ratings(np.array([0, 0, 0, 1, 1]), np.array([3, 12, 5, 11, 14]), np.array([5.0, 4.0, 4.5, 4.0, 5.0]),
                      np.array([10, 20, 30, 5, 5]))
    entries = rated_entries(ratings, 2, 21)
    profiles = sp.csr_matrix(entries.matrix, copy=True)
    profiles.data = model.weigh(entries, np.ones(entries.matrix.nnz)).astype(np.float32)
    fast = model.score(profiles)[:, model.items]
    rows = _Rows(entries.matrix[:, model.items].tocsr(), entries.rating, entries.age)
    kept, buckets, ages = rows.dense(np.arange(2))
    with torch.no_grad():
        slow = network_of(model)(kept, buckets, ages).numpy()
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)


def test_attention_is_learned_from_rating_and_recency():
    """`weigh` multiplies the configured weight by exp(a[rating] + s log(1 + age)): profiles of the same movies with
    other ratings or ages weigh differently once a and s are learned, and the configured weight scales them."""
    model = fitted(epochs=50)
    entries = RatedEntries(sp.csr_matrix(np.ones((1, 3))), np.array([5.0, 4.0, 4.0]), np.array([0.0, 0.0, 9.0]))
    weights = model.weigh(entries, np.ones(3))
    expected = np.exp(model.rating_logit[[10, 8, 8]] + model.age_slope * np.log1p([0.0, 0.0, 9.0]))
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    np.testing.assert_allclose(model.weigh(entries, np.full(3, 0.5)), 0.5 * expected, rtol=1e-6)
    assert model.rating_logit[10] != model.rating_logit[8] and model.age_slope != 0.0


def test_evidence_names_the_profile_movies_behind_a_score_and_a_saved_model_scores_alike(tmp_path):
    """The evidence of a block-0 movie is the profile's block-0 movies, strongest first, and the linearised shares
    add up to the score's user-dependent part to first order; a saved and loaded model scores identically."""
    model = fitted()
    profile = sp.csr_matrix(([1.0, 1.0, 1.0], [0, 1, 12], [0, 3]), shape=(1, 21))
    movies, shares = model.evidence(profile, 4)
    assert movies[:2].tolist() in ([0, 1], [1, 0]) and (np.diff(shares) <= 0).all()
    assert model.evidence(profile, 20) == (pytest.approx(np.empty(0)), pytest.approx(np.empty(0)))
    loaded = load_retriever(model.save(tmp_path).parent)
    assert isinstance(loaded, History)
    np.testing.assert_array_equal(loaded.score(profile), model.score(profile))


def test_fitting_is_deterministic_for_a_seed_and_follows_the_config():
    """`retrieval.history` builds it; the same seed gives the same weights, another seed others."""
    config = load_config(["retrieval.retriever=history", "retrieval.min_rating=4.0", "retrieval.history.dimension=8",
                          "retrieval.history.epochs=5"])
    ratings = two_tastes()
    first, again = (fit_on_ratings("history", config.retrieval, ratings, 40, 21, seed=3) for _ in range(2))
    other = fit_on_ratings("history", config.retrieval, ratings, 40, 21, seed=4)
    assert first.inputs.shape == (20, 8)
    np.testing.assert_array_equal(first.outputs, again.outputs)
    assert not np.array_equal(first.outputs, other.outputs)
    profiles = user_profiles(ratings, 40, 21, config.retrieval, first)
    assert profiles.shape == (40, 21) and profiles.nnz == 240


def test_a_movie_rated_twice_counts_once_with_its_latest_rating():
    ratings = Ratings(np.array([0, 0, 0]), np.array([2, 1, 2]), np.array([5.0, 4.0, 3.0]), np.array([1, 2, 3]))
    entries = rated_entries(ratings, 1, 3)
    assert entries.matrix.indices.tolist() == [1, 2] and entries.rating.tolist() == [4.0, 3.0]
    assert entries.age.tolist() == [1.0, 0.0]
