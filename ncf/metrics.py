"""Rating and ranking metrics, exactly as DESIGN.md section 3 defines them.

All functions are vectorised over users; none loops over users x catalogue.
"""

from __future__ import annotations

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


def seed_ranking_metrics(users: np.ndarray, true: np.ndarray, pred: np.ndarray, k: int = K,
                         threshold: float = 3.0) -> dict[str, float]:
    """Per user over that user's test items, ranked by predicted rating, then averaged.

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
    relevant = t >= threshold
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


def full_ranking_metrics(top_items: np.ndarray, relevant_users: np.ndarray, relevant_items: np.ndarray,
                         n_items: int) -> dict[str, float]:
    """Metrics of top-k lists over the whole catalogue (binary relevance).

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
        f"full_precision_at_{k}": float((hits / k).mean()),
        f"full_recall_at_{k}": float((hits / n_rel).mean()),
        f"full_ndcg_at_{k}": float((dcg / idcg).mean()),
        f"full_hit_rate_at_{k}": float((hits > 0).mean()),
        f"full_map_at_{k}": float(average_precision.mean()),
        "full_coverage": float(len(np.unique(top_items)) / n_items),
    }
