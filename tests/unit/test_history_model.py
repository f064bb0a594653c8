"""The history model (`model.architecture: history`, `ncf.history_encoder`): what a training pair may read of the
user's ratings, what is remembered and saved, profiles of users the model never saw, and training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncf.config import ConfigError, load_config
from ncf.data import MovieLens, Ratings
from ncf.fold_in import start_side
from ncf.model import NCF
from ncf.training.loop import train_loop
from ncf.training.reporting import LocalReporter
from ncf.training.validation import Validation
from ncf.user_ratings import NEW_USER, Profiles

pytestmark = pytest.mark.unit

N_USERS, N_MOVIES = 4, 30


def history_model(length: int = 50) -> NCF:
    torch.manual_seed(0)
    cfg = load_config(["model.architecture=history", "model.embedding_dim=8", "model.hidden_dims=[16, 8]",
                       "model.dropouts=[0.0, 0.0]", f"model.history_length={length}"]).model
    model = NCF(N_USERS, N_MOVIES, cfg)
    with torch.no_grad():
        model.history.rating_logit.copy_(torch.linspace(-1, 1, len(model.history.rating_logit)))
        model.history.age_slope.fill_(-0.3)
    return model.eval()


def sequence(user: int, movies: list[int], ratings: list[float]) -> Ratings:
    """`user` rating `movies` in this order (timestamps 100, 200, ...)."""
    n = len(movies)
    return Ratings(np.full(n, user), np.asarray(movies), np.asarray(ratings, dtype=float),
                   np.arange(1, n + 1, dtype=np.int64) * 100)


USER, MOVIES, RATINGS = 2, [7, 3, 12, 25, 9, 18], [4.0, 2.5, 5.0, 1.0, 3.5, 4.5]


def pair_output(model: NCF, movie: int, target: int) -> torch.Tensor:
    """The training view of (USER, `movie`): the history before USER's rating of `target`."""
    with torch.no_grad():
        return model(torch.tensor([USER]), torch.tensor([movie]), torch.tensor([target])).rating


def test_a_training_pair_never_reads_its_own_rating_or_a_later_one():
    """Causal: the pair of the k-th rating reads exactly the ratings before it. Changing its own rating or any later
    one changes nothing it computes; changing an earlier one does."""
    model = history_model()
    model.remember(sequence(USER, MOVIES, RATINGS))
    movies, _, ages, valid = model.history.history.window(torch.tensor([USER] * len(MOVIES)),
                                                          torch.tensor(MOVIES), model.history.length)
    for k, movie in enumerate(MOVIES):
        assert movies[k][valid[k]].tolist() == MOVIES[:k], movie  # oldest first, the latest has age 0
        assert ages[k][valid[k]].tolist() == list(range(k - 1, -1, -1))
    k = 3
    before = pair_output(model, MOVIES[k], MOVIES[k])
    for later in range(k, len(MOVIES)):
        changed = list(RATINGS)
        changed[later] = 0.5 if RATINGS[later] > 1 else 5.0
        model.remember(sequence(USER, MOVIES, changed))
        assert torch.equal(pair_output(model, MOVIES[k], MOVIES[k]), before), later
    changed = list(RATINGS)
    changed[k - 1] = 0.5
    model.remember(sequence(USER, MOVIES, changed))
    assert not torch.equal(pair_output(model, MOVIES[k], MOVIES[k]), before)
    # Only the earlier ratings remembered: the same output for that pair (nothing of the later ones leaks in).
    model.remember(sequence(USER, MOVIES[:k], RATINGS[:k]))
    assert torch.allclose(pair_output(model, MOVIES[k], 0), before, atol=1e-6)


def test_served_pairs_read_the_latest_history_length_ratings():
    """A movie the user has not rated (validation, test, serving) reads the user's latest `history_length`."""
    model = history_model(length=4)
    model.remember(sequence(USER, MOVIES, RATINGS))
    movies, buckets, _, valid = model.history.history.window(torch.tensor([USER, 0]), torch.tensor([1, 1]), 4)
    assert movies[0][valid[0]].tolist() == MOVIES[-4:]
    assert buckets[0][valid[0]].tolist() == [int(r * 2) for r in RATINGS[-4:]]
    assert not valid[1].any()  # user 0 rated nothing: the id's embedding alone
    with torch.no_grad():
        assert torch.equal(model.history(torch.tensor([0])), torch.zeros(1, 8))
        assert torch.equal(model.user_side(torch.tensor([USER])).embedding,
                           model.user_side(torch.tensor([USER]), torch.tensor([1])).embedding)


def test_attention_follows_rating_and_recency():
    """The pooled vector is the softmax(a[rating] + s log(1 + age))-weighted sum of the window's movie embeddings,
    each times v[rating]."""
    model = history_model()
    model.remember(sequence(USER, MOVIES, RATINGS))
    with torch.no_grad():
        got = model.history(torch.tensor([USER]))[0]
        logits = torch.stack([model.history.rating_logit[int(r * 2)] - 0.3 * np.log1p(len(MOVIES) - 1 - i)
                              for i, r in enumerate(RATINGS)])
        weights = torch.softmax(logits, 0) * model.history.rating_value[[int(r * 2) for r in RATINGS]]
        expected = (weights[:, None] * model.history.embedding.weight[MOVIES]).sum(0)
    assert torch.allclose(got, expected, atol=1e-6)


def test_histories_are_saved_with_the_weights():
    """A state dict carries the remembered ratings: a fresh model loading it scores every user the same."""
    model = history_model()
    model.remember(Ratings.concat(sequence(USER, MOVIES, RATINGS), sequence(1, [4, 5], [3.0, 5.0])))
    state = model.state_dict()
    assert "history._extra_state" in state and isinstance(state["history._extra_state"], torch.Tensor)
    loaded = NCF(N_USERS, N_MOVIES, model.cfg)
    loaded.load_state_dict(state)
    loaded.eval()
    users = torch.arange(N_USERS)
    assert torch.equal(loaded.score_users(users), model.score_users(users))
    # Another architecture's state has no histories: models saved before the history model load as they did.
    assert not any("history" in key for key in NCF(N_USERS, N_MOVIES, load_config([]).model).state_dict())


def test_a_profile_is_pooled_from_its_own_ratings_known_or_new():
    """A known user's profile of their remembered ratings starts where the user side is; a new user's profile is
    pooled from its ratings (no id embedding: the mean one), and different ratings give a different start."""
    model = history_model()
    model.remember(sequence(USER, MOVIES, RATINGS))
    known = Profiles.one(MOVIES, RATINGS, user=USER)
    with torch.no_grad():
        assert torch.allclose(start_side(model, known).embedding, model.user_side(torch.tensor([USER])).embedding,
                              atol=1e-6)
        new = start_side(model, Profiles.one(MOVIES, RATINGS, user=NEW_USER)).embedding
        mean = model.user_embedding.weight.mean(0)
        assert torch.allclose(new[0] - mean, model.history(torch.tensor([USER]))[0], atol=1e-6)
        other = start_side(model, Profiles.one(MOVIES[:2], [5.0, 5.0], user=NEW_USER)).embedding
        assert not torch.allclose(new, other)
        assert torch.allclose(start_side(model, Profiles.one([], [], user=NEW_USER)).embedding[0], mean)


def test_history_length_must_be_positive_and_histories_held_in_memory():
    with pytest.raises(ConfigError, match="history_length"):
        load_config(["model.history_length=0"])
    with pytest.raises(ConfigError, match="data.loader in_memory"):
        load_config(["model.architecture=history", "data.loader=ray_data"])


@pytest.mark.parametrize("objective", ["rating", "joint"])
def test_the_history_model_learns_and_refits_on_every_rating(tiny_config, tiny_movielens: MovieLens, objective):
    """On the tiny data: the loss falls and validation improves; the refit remembers train + validation."""
    config = load_config([f"data.dir={tiny_config.data.dir}", "model.architecture=history",
                          f"model.objective={objective}", "train.max_epochs=4", "train.patience=4",
                          "train.refit=true", "train.batch_size=128"], preset="tiny")
    result = train_loop(config, tiny_movielens, LocalReporter(verbose=False),
                        Validation(config, tiny_movielens, rank=0))
    search = [m for m in result.history if m["phase"] == 0]
    assert search[-1]["train_loss"] < search[0]["train_loss"]
    assert search[-1]["val_rmse"] < search[0]["val_rmse"]
    remembered = result.model.history.history
    assert len(remembered.movies) == len(tiny_movielens.splits.train_and_validation())


def test_the_attention_shares_add_up_to_the_pooled_history_along_a_direction():
    """`shares`: each windowed rating's term of the pooled vector's dot product with a direction; they add up to it,
    and the latest `history_length` ratings are the ones that have a term."""
    model = history_model(length=4)
    profile = Profiles.one(MOVIES, RATINGS)
    direction = torch.randn(8, generator=torch.Generator().manual_seed(2))
    movies, terms = model.history.shares(profile.of(0), direction)
    assert movies.tolist() == MOVIES[-4:]
    with torch.no_grad():
        pooled = model.history.profile_vectors(profile.ratings, 1)[0]
    assert terms.sum() == pytest.approx(float(pooled @ direction), abs=1e-5)
