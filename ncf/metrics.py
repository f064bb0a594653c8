"""Rating and ranking metrics, exactly as docs/evaluation.md defines them.

All functions are vectorised over users; none loops over users x catalogue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

K = 10


def rmse(true: np.ndarray, pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(true) - np.asarray(pred)) ** 2)))


def mae(true: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(true) - np.asarray(pred))))


def _rank_within_user(users: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order grouping rows by user, best score first (stable), and each row's 0-based rank."""
    order = np.lexsort((-scores, users))
    sorted_users = users[order]
    start = np.searchsorted(sorted_users, sorted_users, side="left")
    return order, np.arange(len(order)) - start


def seed_ranking_metrics(users: np.ndarray, true: np.ndarray, pred: np.ndarray, k: int = K, *,
                         relevant_rating: float) -> dict[str, float]:
    """Per user over that user's test items, ranked by predicted rating, then averaged; an item is relevant
    when its true rating is at least `relevant_rating` (the config's `evaluation.seed_relevant_rating`).

    Precision = hits / min(k, n_test); Recall = hits / n_relevant (users with a
    relevant item); F = 2PR/(P+R) of the averages; NDCG with the true rating as gain.
    """
    users = np.asarray(users)
    true = np.asarray(true, dtype=float)
    _, dense_users = np.unique(users, return_inverse=True)
    n = dense_users.max() + 1
    order, rank = _rank_within_user(dense_users, np.asarray(pred, dtype=float))
    u, t = dense_users[order], true[order]
    top = rank < k
    discount = 1.0 / np.log2(rank + 2.0)

    n_test = np.bincount(u, minlength=n)
    relevant = t >= relevant_rating
    n_rel = np.bincount(u, weights=relevant, minlength=n)
    hits = np.bincount(u, weights=relevant & top, minlength=n)
    precision = hits / np.minimum(k, n_test)
    has_rel = n_rel > 0
    recall = hits[has_rel] / n_rel[has_rel]

    dcg = np.bincount(u, weights=np.where(top, t * discount, 0.0), minlength=n)
    ideal_order, ideal_rank = _rank_within_user(u, t)
    ideal_gain = t[ideal_order] / np.log2(ideal_rank + 2.0)
    idcg = np.bincount(u[ideal_order], weights=np.where(ideal_rank < k, ideal_gain, 0.0), minlength=n)
    ndcg = dcg / idcg

    p, r = float(precision.mean()), float(recall.mean()) if len(recall) else 0.0
    return {
        f"precision_at_{k}": p,
        f"recall_at_{k}": r,
        f"f_at_{k}": 2 * p * r / (p + r) if p + r > 0 else 0.0,
        f"ndcg_at_{k}": float(ndcg.mean()),
    }


def full_ranking_per_user(top_items: np.ndarray, relevant_users: np.ndarray, relevant_items: np.ndarray,
                          n_items: int) -> dict[str, np.ndarray]:
    """Per-user figures behind `full_ranking_metrics` (one entry per row of `top_items`), for paired tests.

    `top_items[i]` is user i's ranked list (train items already excluded);
    (`relevant_users`, `relevant_items`) are the relevant pairs with `relevant_users`
    indexing rows of `top_items`. Every row must have at least one relevant item.
    """
    n_users, k = top_items.shape
    relevant_keys = np.asarray(relevant_users, dtype=np.int64) * n_items + np.asarray(relevant_items)
    row_keys = np.arange(n_users, dtype=np.int64)[:, None] * n_items + top_items
    hit = np.isin(row_keys, relevant_keys)
    n_rel = np.bincount(relevant_users, minlength=n_users)
    if (n_rel == 0).any():
        raise ValueError("every ranked user needs at least one relevant item")
    hits = hit.sum(axis=1)
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    dcg = (hit * discount).sum(axis=1)
    ideal_len = np.minimum(k, n_rel)
    idcg = np.cumsum(discount)[ideal_len - 1]
    precision_at_rank = np.cumsum(hit, axis=1) / np.arange(1, k + 1)
    average_precision = (precision_at_rank * hit).sum(axis=1) / ideal_len
    return {
        f"full_precision_at_{k}": hits / k,
        f"full_recall_at_{k}": hits / n_rel,
        f"full_ndcg_at_{k}": dcg / idcg,
        f"full_hit_rate_at_{k}": (hits > 0).astype(np.float64),
        f"full_map_at_{k}": average_precision,
    }


def full_ranking_summary(per_user: dict[str, np.ndarray], top_items: np.ndarray, n_items: int) -> dict[str, float]:
    """Averages of `full_ranking_per_user` over users, plus catalogue coverage of the lists and the number of
    users ranked (`full_users`: a sampled evaluation says how many)."""
    return {name: float(values.mean()) for name, values in per_user.items()} | {
        "full_coverage": float(len(np.unique(top_items)) / n_items), "full_users": float(len(top_items))}


def full_ranking_metrics(top_items: np.ndarray, relevant_users: np.ndarray, relevant_items: np.ndarray,
                         n_items: int) -> dict[str, float]:
    """Metrics of top-k lists over the whole catalogue (binary relevance).

    `top_items[i]` is user i's ranked list (train items already excluded);
    (`relevant_users`, `relevant_items`) are the relevant pairs with `relevant_users`
    indexing rows of `top_items`. Every row must have at least one relevant item.
    """
    per_user = full_ranking_per_user(top_items, relevant_users, relevant_items, n_items)
    return full_ranking_summary(per_user, top_items, n_items)


# ----------------------------------------------------------------------------- sampled protocol, paired tests

# Scores (users [U], candidate items [U, C]) -> [U, C]: what the sampled protocol asks of a model.
PairScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def leave_one_out(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Mask of each user's latest interaction (He et al. 2017); ties go to the later row, so it is deterministic."""
    users = np.asarray(users)
    order = np.lexsort((np.arange(len(users)), np.asarray(timestamps), users))
    last = np.r_[users[order][1:] != users[order][:-1], True] if len(users) else np.zeros(0, dtype=bool)
    mask = np.zeros(len(users), dtype=bool)
    mask[order[last]] = True
    return mask


def sample_negatives(users: np.ndarray, rated_users: np.ndarray, rated_items: np.ndarray, n_items: int,
                     n_negatives: int = 99, seed: int = 0) -> np.ndarray:
    """[len(users), n_negatives] distinct items each user never rated (any rated pair, held-out ones included).

    Vectorised rejection sampling, deterministic for a seed: draw a surplus per row, drop rated
    items and repeats, keep the first `n_negatives`; rows left short draw again with a larger surplus.
    """
    users = np.asarray(users, dtype=np.int64)
    rated_keys = np.unique(np.asarray(rated_users, dtype=np.int64) * n_items + np.asarray(rated_items))
    n_rated = np.bincount(rated_keys // n_items, minlength=int(users.max(initial=0)) + 1)[users]
    if (n_items - n_rated < n_negatives).any():
        raise ValueError(f"a user has rated too much of the catalogue to leave {n_negatives} negatives")
    rng = np.random.default_rng(seed)
    out = np.empty((len(users), n_negatives), dtype=np.int64)
    todo, width = np.arange(len(users)), 2 * n_negatives + 16
    while len(todo):
        draw = rng.integers(0, n_items, size=(len(todo), width))
        valid = ~np.isin(users[todo, None] * n_items + draw, rated_keys)
        order = np.argsort(draw, axis=1, kind="stable")
        ordered = np.take_along_axis(draw, order, axis=1)
        repeat = np.zeros_like(valid)
        np.put_along_axis(repeat, order, np.c_[np.zeros(len(todo), bool), ordered[:, 1:] == ordered[:, :-1]], axis=1)
        valid &= ~repeat
        done = valid.sum(axis=1) >= n_negatives
        first_valid = np.argsort(~valid[done], axis=1, kind="stable")[:, :n_negatives]
        out[todo[done]] = np.take_along_axis(draw[done], first_valid, axis=1)
        todo, width = todo[~done], width * 2
    return out


def sampled_ranking_metrics(score_pairs: PairScoreFn, users: np.ndarray, held_out_items: np.ndarray,
                            rated_users: np.ndarray, rated_items: np.ndarray, n_items: int, n_negatives: int = 99,
                            k: int = K, seed: int = 0, per_user: bool = False,
                            chunk: int = 4096) -> dict[str, float] | dict[str, np.ndarray]:
    """The NCF paper's protocol (He et al. 2017): each user's held-out item ranked among `n_negatives`
    sampled items the user never rated; HR@k and NDCG@k (one relevant item: 1 / log2(rank + 2)).

    `users[i]` held out `held_out_items[i]` (see `leave_one_out`); (`rated_users`, `rated_items`)
    are all the user's interactions, held-out ones included, so none is drawn as a negative.
    Ties count against the model (a constant scorer ranks the item last, not first). Far
    easier than full ranking: kept to compare with the literature, not to choose models.
    """
    users = np.asarray(users, dtype=np.int64)
    negatives = sample_negatives(users, rated_users, rated_items, n_items, n_negatives, seed)
    candidates = np.c_[np.asarray(held_out_items, dtype=np.int64), negatives]
    rank = np.empty(len(users), dtype=np.int64)
    for start in range(0, len(users), chunk):
        part = slice(start, start + chunk)
        scores = np.asarray(score_pairs(users[part], candidates[part]), dtype=np.float64)
        rank[part] = (scores[:, 1:] >= scores[:, :1]).sum(axis=1)
    hit = rank < k
    values = {f"sampled_hr_at_{k}": hit.astype(np.float64),
              f"sampled_ndcg_at_{k}": np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)}
    return values if per_user else {name: float(v.mean()) for name, v in values.items()}


class BootstrapInterval(NamedTuple):
    difference: float  # mean over users of a - b
    low: float  # 2.5th percentile of the resampled mean differences
    high: float  # 97.5th percentile


def paired_bootstrap(per_user_a: np.ndarray, per_user_b: np.ndarray, n_resamples: int = 2000,
                     seed: int = 0) -> BootstrapInterval:
    """Mean per-user difference a - b with a 95% percentile interval, resampling users (paired).

    Pairing by user removes the between-user spread that two separate intervals would
    double count. `per_user_b` all zeros gives the interval of a's own mean.
    """
    diff = np.asarray(per_user_a, dtype=np.float64) - np.asarray(per_user_b, dtype=np.float64)
    if diff.ndim != 1 or len(diff) == 0:
        raise ValueError("paired_bootstrap needs two equal-length, non-empty per-user arrays")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, 4_000_000 // len(diff))  # resamples per batch: bounded memory
    for start in range(0, n_resamples, step):
        count = min(step, n_resamples - start)
        means[start: start + count] = diff[rng.integers(0, len(diff), size=(count, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return BootstrapInterval(float(diff.mean()), float(low), float(high))
