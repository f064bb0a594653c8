"""The full metric table of any model on the test split, and full ranking against any held-out slice."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ncf.baselines import BASELINES
from ncf.data import MovieLens, Ratings
from ncf.metrics import K, full_ranking_per_user, full_ranking_summary, mae, rmse, seed_ranking_metrics
from ncf.ranking import ScoreFn, SeenItems, top_k_unseen

FULL_RANKING_THRESHOLD = 4.0


class Scorable(Protocol):
    predict: object  # (users, movies) -> ratings, or None
    score: ScoreFn | None


def seen_in_training(data: MovieLens) -> SeenItems:
    """Train + validation items per user: everything but the test split."""
    seen = data.splits.train_and_validation()
    return SeenItems(seen.user, seen.movie, data.n_users)


def full_ranking_against(score: ScoreFn, seen: SeenItems, target: Ratings, n_movies: int, k: int = K,
                         threshold: float = FULL_RANKING_THRESHOLD, chunk: int = 16) -> tuple[dict[str, float],
                                                                                          dict[str, np.ndarray]]:
    """Full-ranking metrics of `score` against a held-out slice (the test split, or validation when choosing
    settings), and the per-user arrays behind them: users with a relevant (>= `threshold`) target item,
    every movie not in `seen` ranked. Per-user rows follow the sorted user ids."""
    relevant = target.rating >= threshold
    users = np.unique(target.user[relevant])
    top, _ = top_k_unseen(score, users, seen, k, chunk=chunk)
    row_of_user = np.full(int(target.user.max(initial=0)) + 1, -1)
    row_of_user[users] = np.arange(len(users))
    per_user = full_ranking_per_user(top, row_of_user[target.user[relevant]], target.movie[relevant], n_movies)
    return full_ranking_summary(per_user, top, n_movies), per_user


def evaluate(model: Scorable, data: MovieLens, k: int = K) -> dict[str, float]:
    test = data.splits.test
    metrics: dict[str, float] = {}
    if model.predict is not None:
        pred = np.asarray(model.predict(test.user, test.movie), dtype=float)
        metrics["rmse"] = rmse(test.rating, pred)
        metrics["mae"] = mae(test.rating, pred)
        metrics.update(seed_ranking_metrics(test.user, test.rating, pred, k=k))
    if model.score is not None:
        metrics.update(full_ranking_against(model.score, seen_in_training(data), test, data.n_movies, k)[0])
    return metrics


def evaluate_baselines(data: MovieLens, k: int = K) -> dict[str, dict[str, float]]:
    fit_on = data.splits.train_and_validation()
    return {cls.name: evaluate(cls().fit(fit_on, data.n_users, data.n_movies), data, k) for cls in BASELINES}


# The original deck's own report, shown as a reference row (not re-measured).
DECK_REPORTED = {"rmse": 0.8968, "mae": 0.6870, "precision_at_10": 0.8497, "recall_at_10": 0.6362,
                 "f_at_10": 0.7276, "ndcg_at_10": 0.8851}
TABLE_COLUMNS = ("rmse", "mae", "precision_at_10", "recall_at_10", "f_at_10", "ndcg_at_10",
                 "full_precision_at_10", "full_recall_at_10", "full_ndcg_at_10", "full_hit_rate_at_10",
                 "full_map_at_10", "full_coverage")


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A fixed-width metric table; '-' where a model does not produce a metric."""
    short = {"rmse": "RMSE", "mae": "MAE", "precision_at_10": "P@10", "recall_at_10": "R@10", "f_at_10": "F@10",
             "ndcg_at_10": "NDCG@10", "full_precision_at_10": "full P@10", "full_recall_at_10": "full R@10",
             "full_ndcg_at_10": "full NDCG@10", "full_hit_rate_at_10": "full HR@10", "full_map_at_10": "full MAP@10",
             "full_coverage": "coverage"}
    name_width = max(len(n) for n in rows) + 2
    lines = ["model".ljust(name_width) + "".join(f"{short[c]:>14}" for c in TABLE_COLUMNS)]
    for name, metrics in rows.items():
        cells = "".join(f"{metrics[c]:>14.4f}" if c in metrics else f"{'-':>14}" for c in TABLE_COLUMNS)
        lines.append(name.ljust(name_width) + cells)
    return "\n".join(lines)
