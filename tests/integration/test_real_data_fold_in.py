"""The fold-in on the real data: a user's newer ratings folded into the frozen deck model predict the user's later
ratings better than the embedding trained before them, and a user the model never saw gets a useful vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncf.config import load_config
from ncf.data import MovieLens, Ratings
from ncf.fold_in import fold_in, start_side
from ncf.metrics import rmse
from ncf.model import NCF, forward_batched
from ncf.training.loop import train_loop
from ncf.training.reporting import LocalReporter
from ncf.training.validation import Validation
from ncf.user_ratings import NEW_USER, Profiles

# The deck's model, a few epochs on train (no refit): a minute on this 2-core machine.
DECK = ["train.max_epochs=4", "train.refit=false"]
CHUNK = 64  # profiles folded in together (each row's fit is its own: this bounds the memory only)


@pytest.fixture(scope="module")
def deck_model(movielens: MovieLens) -> NCF:
    config = load_config(DECK, preset="deck")
    result = train_loop(config, movielens, LocalReporter(verbose=False), Validation(config, movielens, rank=0))
    return result.model.eval()


def halves_by_time(test: Ratings) -> tuple[Ratings, Ratings]:
    """Each user's test ratings split in time: the earlier half (rounded down) and the later half."""
    order = np.lexsort((test.timestamp, test.user))
    ordered = test.take(order)
    starts = np.searchsorted(ordered.user, ordered.user, side="left")
    counts = np.bincount(ordered.user)[ordered.user]
    earlier = np.arange(len(ordered)) - starts < counts // 2
    return ordered.take(np.flatnonzero(earlier)), ordered.take(np.flatnonzero(~earlier))


def concatenated(*parts: Ratings) -> Ratings:
    return Ratings(*(np.concatenate([getattr(part, f) for part in parts]) for f in Ratings.DTYPES))


def folded_rmse(model: NCF, profiles: Profiles, held_out: Ratings, fold: bool) -> float:
    """RMSE on `held_out` (users by profile row) of the folded-in user sides, or of the start vectors unfolded."""
    predicted = np.empty(len(held_out))
    for start in range(0, len(profiles), CHUNK):
        rows = np.arange(start, min(start + CHUNK, len(profiles)))
        part = profiles.take(rows)
        side = fold_in(model, part) if fold else start_side(model, part)
        pairs = np.flatnonzero(np.isin(held_out.user, rows))
        out = forward_batched(model, torch.from_numpy(held_out.user[pairs] - start), torch.from_numpy(
            held_out.movie[pairs]), user_side=side)
        predicted[pairs] = out.rating.numpy()
    return rmse(held_out.rating, predicted)


def test_folding_in_newer_ratings_predicts_later_ones_better(deck_model: NCF, movielens: MovieLens):
    splits = movielens.splits
    earlier, later = halves_by_time(splits.test)
    profiles = Profiles.of_ratings(concatenated(splits.train_and_validation(), earlier), movielens.n_users)
    as_new = Profiles(profiles.ratings, profiles.indptr, np.full(len(profiles), NEW_USER))
    figures = {
        "trained embedding": folded_rmse(deck_model, profiles, later, fold=False),
        "trained embedding + fold-in": folded_rmse(deck_model, profiles, later, fold=True),
        "new user, mean embedding": folded_rmse(deck_model, as_new, later, fold=False),
        "new user + fold-in": folded_rmse(deck_model, as_new, later, fold=True),
    }
    print(f"\nRMSE on the later half of {len(later)} test ratings ({len(profiles)} users):")
    for name, value in figures.items():
        print(f"  {name:30s} {value:.4f}")
    assert figures["trained embedding + fold-in"] < figures["trained embedding"]
    assert figures["new user + fold-in"] < figures["new user, mean embedding"]
