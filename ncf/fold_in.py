"""Folding users' ratings into the frozen model: the user side (embedding, bias) that predicts them.

The user embeddings are fitted at training time; a user who has rated movies since, or one the model never saw,
is folded in: from the trained vectors (a new user: the mean of every user's; a history model adds the pooled
ratings of the profile itself, `ncf.history_encoder`), a few Adam steps on that user's
ratings alone fit the rating head's prediction to each rating (the model's eval-mode forward, `NCF.pair_logits`,
its movie side computed once), with an L2 pull towards the start so that a couple of ratings move it a little,
not wildly. A model with only an interaction head (`objective: implicit`) fits its logit to "rated" on the rated
movies against `NEGATIVES` sampled unrated movies per rating (binary cross-entropy, as it was trained).

Every profile row is fitted in one optimisation, each row on a loss of its own: Adam's steps are per coordinate,
so a row's result does not depend on the others; a row without ratings keeps its start vector. The model's
parameters, their gradients and its train/eval mode are left as they were.
"""

from __future__ import annotations

import numpy as np
import torch

from ncf.model import NCF, UserSide
from ncf.user_ratings import Profiles

__all__ = ["UserSide", "fold_in", "start_side"]

# Chosen on the real data (tests/integration/test_real_data_fold_in.py, the deck's model, 4 epochs): the later half
# of each user's test ratings, with the earlier half folded in, RMSE 0.9146 -> 0.899 (from the mean user: 1.014 ->
# 0.899). 10 steps of 0.01 reach 0.8925 but take the deck's 100-rating fold-in from 10 ms to 15 ms on one thread;
# larger steps overshoot (6 of 0.02: 0.901, 10 of 0.05: 0.903); the pull barely matters between 0.1 and 10.
STEPS, LEARNING_RATE, L2 = 6, 0.015, 1.0
# The ratings of a profile a fold-in reads: its latest. A known user's embedding already holds their older ones, and
# the cost grows with the ratings read (a user with 2,000 took over 100 ms on one thread; 100 take about 10 ms).
# Reading the latest 100 rather than every rating also fits better on the same check: 0.9146 -> 0.872 (new users:
# 1.014 -> 0.882); the step settings above were chosen reading every rating.
LATEST = 100
NEGATIVES = 4  # sampled unrated movies per rating, for a model without a rating head (as in training)


def start_side(model: NCF, profiles: Profiles) -> UserSide:
    """Where each row's fold-in starts: its user's trained vectors, the mean user's for `NEW_USER` rows; a history
    model adds each row's own ratings, pooled (`HistoryEncoder.profile_vectors`), whatever the user."""
    with torch.no_grad():
        known = torch.from_numpy(profiles.known())
        looked_up = model.id_side(torch.from_numpy(np.where(profiles.known(), profiles.users, 0)))
        mean = model.id_side(torch.arange(model.user_embedding.num_embeddings))
        embedding = torch.where(known[:, None], looked_up.embedding, mean.embedding.mean(0))
        bias = None if mean.bias is None else torch.where(known, looked_up.bias, mean.bias.mean())
        if model.reads_history:
            embedding = embedding + model.history.profile_vectors(profiles.ratings, len(profiles))
    return UserSide(embedding, bias)


def _targets(model: NCF, profiles: Profiles, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fitted pairs (profile row, movie) and their targets: the ratings for a rating head; 1 on the rated
    movies and 0 on sampled unrated ones for an interaction head alone. Unknown ratings (NaN) are left out."""
    rated = profiles.ratings
    rows, movies, targets = rated.user, rated.movie, rated.rating
    if "rating" in model.heads:
        keep = np.isfinite(targets)
        return (torch.from_numpy(rows[keep]), torch.from_numpy(movies[keep]),
                torch.from_numpy(targets[keep]).float())
    n_movies = model.movie_embedding.num_embeddings
    negative_rows = np.repeat(rows, NEGATIVES)
    negatives = np.random.default_rng(seed).integers(n_movies, size=len(negative_rows))
    unrated = ~np.isin(negative_rows * n_movies + negatives, rows * n_movies + movies)
    rows = np.concatenate([rows, negative_rows[unrated]])
    movies = np.concatenate([movies, negatives[unrated]])
    labels = np.r_[np.ones(len(rated)), np.zeros(int(unrated.sum()))]
    return torch.from_numpy(rows), torch.from_numpy(movies), torch.from_numpy(labels).float()


def fold_in(model: NCF, profiles: Profiles, steps: int = STEPS, lr: float = LEARNING_RATE, l2: float = L2,
            seed: int = 0, latest: int = LATEST) -> UserSide:
    """One user side per profile row fitted to the row's `latest` ratings against the frozen model: per row,
    sum of squared rating errors (or the interaction head's cross-entropy) + l2 * squared distance from the start
    (embedding and bias), minimised by `steps` Adam steps of size `lr`. `seed`: the sampled unrated movies'."""
    start = start_side(model, profiles)
    profiles = profiles.latest(latest)
    rows, movies, targets = _targets(model, profiles, seed)
    if not len(rows) or steps == 0:
        return start
    head = "rating" if "rating" in model.heads else "interaction"
    movie_side = model.movie_side(torch.unique(movies))
    origins = [start.embedding] if start.bias is None else [start.embedding, start.bias]
    fitted = [origin.clone().requires_grad_() for origin in origins]
    optimiser = torch.optim.Adam(fitted, lr=lr)
    low, span = model.cfg.rating_min, model.cfg.rating_max - model.cfg.rating_min
    for _ in range(steps):
        side = UserSide(fitted[0], fitted[1] if len(fitted) > 1 else None)
        logit = model.pair_logits(side, rows, movies, movie_side, head)
        if head == "rating":
            error = torch.sum((low + span * torch.sigmoid(logit) - targets) ** 2)
        else:
            error = torch.nn.functional.binary_cross_entropy_with_logits(logit, targets, reduction="sum")
        pull = sum(torch.sum((value - origin) ** 2) for value, origin in zip(fitted, origins, strict=True))
        for value, gradient in zip(fitted, torch.autograd.grad(error + l2 * pull, fitted), strict=True):
            value.grad = gradient
        optimiser.step()
    return UserSide(fitted[0].detach(), fitted[1].detach() if len(fitted) > 1 else None)

