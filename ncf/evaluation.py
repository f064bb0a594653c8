"""The full metric table of any model on the test split, and full ranking against any held-out slice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from ncf.baselines import BASELINES
from ncf.config import EvaluationConfig, RetrievalConfig
from ncf.data import MovieLens, Ratings
from ncf.metrics import (
    K,
    PairScoreFn,
    full_ranking_per_user,
    full_ranking_summary,
    mae,
    rmse,
    sampled_ranking_metrics,
    seed_ranking_metrics,
)
from ncf.ranking import ScoreFn, candidate_retriever, top_k_unseen
from ncf.retrievers import RETRIEVERS
from ncf.retrievers.matrices import fit_on_ratings
from ncf.user_ratings import SeenItems


class Scorable(Protocol):
    """A model as evaluation sees it: pair predictions (or None), catalogue scores (or None) and,
    optionally, its own `rank(users, seen, k) -> movie indices [U, k]` (retrieval + re-ranking)."""

    predict: object  # (users, movies) -> ratings, or None
    score: ScoreFn | None


Ranker = Callable[[np.ndarray, SeenItems, int], np.ndarray]  # users, seen, k -> movies [U, k], best first


def seen_in_training(data: MovieLens) -> SeenItems:
    """Train + validation items per user: everything but the test split."""
    seen = data.splits.train_and_validation()
    return SeenItems(seen.user, seen.movie, data.n_users)


def sampled_users(eligible: np.ndarray, sample: EvaluationConfig | None) -> np.ndarray:
    """`sample.users` of the sorted `eligible` users, drawn with `sample.seed`, sorted: the same users for the
    same slice and seed whatever the model, so figures of different models stay paired. All of them
    without a sample or when it asks for as many or more."""
    if sample is None or sample.users is None or sample.users >= len(eligible):
        return eligible
    return np.sort(np.random.default_rng(sample.seed).choice(eligible, size=sample.users, replace=False))


def relevant_targets(target: Ratings, evaluation: EvaluationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Users with a relevant (rated at least `evaluation.relevant_rating`) held-out movie (all, or `evaluation`'s
    seeded sample of them), sorted, and their relevant pairs as (row in those users, movie)."""
    relevant = target.rating >= evaluation.relevant_rating
    users = sampled_users(np.unique(target.user[relevant]), evaluation)
    row_of_user = np.full(int(target.user.max(initial=0)) + 1, -1)
    row_of_user[users] = np.arange(len(users))
    rows = row_of_user[target.user[relevant]]
    kept = rows >= 0  # pairs of users left out of the sample
    return users, rows[kept], target.movie[relevant][kept]


def score_ranker(score: ScoreFn, chunk: int = 16) -> Ranker:
    """Rank by a catalogue score: each user's k best-scored unseen movies."""
    return lambda users, seen, k: top_k_unseen(score, users, seen, k, chunk=chunk)[0]


def full_ranking_against(rank: Ranker, seen: SeenItems, target: Ratings, n_movies: int, k: int = K, *,
                         evaluation: EvaluationConfig) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Full-ranking metrics of `rank` against a held-out slice (the test split, or validation when choosing
    settings), and the per-user arrays behind them: users with a relevant target item (`relevant_targets`),
    every movie not in `seen` ranked. Per-user rows follow the sorted user ids."""
    users, rows, movies = relevant_targets(target, evaluation)
    top = rank(users, seen, k)
    per_user = full_ranking_per_user(top, rows, movies, n_movies)
    return full_ranking_summary(per_user, top, n_movies), per_user


def ranker_of(model: Scorable) -> Ranker | None:
    rank = getattr(model, "rank", None)
    return rank or (score_ranker(model.score) if model.score is not None else None)


def evaluate(model: Scorable, data: MovieLens, k: int = K, *, evaluation: EvaluationConfig) -> dict[str, float]:
    return evaluate_per_user(model, data, k, evaluation=evaluation)[0]


def evaluate_per_user(model: Scorable, data: MovieLens, k: int = K, *, evaluation: EvaluationConfig,
                      rank: Ranker | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """`evaluate`'s metrics and the per-user full-ranking figures behind them (empty without a ranking),
    for paired comparisons without ranking the test users a second time. Relevance is `evaluation`'s: its
    `seed_relevant_rating` in the deck's per-user ranking of the test movies, its `relevant_rating` in full
    ranking, which ranks `evaluation`'s users (all, or a seeded sample) with `rank` (default: the model's own
    ranking; another runner of it, e.g. `ncf.integrations.ray_data.actor_pool_ranker`, must rank exactly alike)."""
    test = data.splits.test
    metrics: dict[str, float] = {}
    per_user: dict[str, np.ndarray] = {}
    if model.predict is not None:
        pred = np.asarray(model.predict(test.user, test.movie), dtype=float)
        metrics["rmse"] = rmse(test.rating, pred)
        metrics["mae"] = mae(test.rating, pred)
        metrics.update(seed_ranking_metrics(test.user, test.rating, pred, k=k,
                                            relevant_rating=evaluation.seed_relevant_rating))
    rank = rank or ranker_of(model)
    if rank is not None:
        summary, per_user = full_ranking_against(rank, seen_in_training(data), test, data.n_movies, k,
                                                 evaluation=evaluation)
        metrics.update(summary)
    return metrics, per_user


class RetrievalBaseline:
    """A registered retriever on its own, fitted exactly as the served recommender's and scoring the same
    profiles through the served retrieval stage without its sequence signal, as a ranking baseline: its row in the
    metric table bears its name. A user it cannot score (no liked movie in the fit) gets the most rated movies,
    as served: without them, under one global time cut (`data.split.protocol: temporal`) most test users would
    go unranked and the row would read far below what the stage serves."""

    predict = None

    def __init__(self, name: str, cfg: RetrievalConfig, seed: int = 0):
        self.name, self.cfg, self.seed = name, cfg, seed

    def fit(self, ratings: Ratings, n_users: int, n_movies: int) -> RetrievalBaseline:
        cfg = self.cfg.without_sequence()
        self.stage = candidate_retriever(fit_on_ratings(self.name, cfg, ratings, n_users, n_movies, self.seed), cfg,
                                         ratings, n_users, n_movies)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        return self.stage.score(np.asarray(users))


def retrieval_baselines(cfg: RetrievalConfig, seed: int = 0) -> list[RetrievalBaseline]:
    """One baseline per registered retriever, each with its section of `cfg`: those whose fit takes minutes
    (`Retriever.fits_in_seconds` false) only when `cfg` serves them."""
    return [RetrievalBaseline(name, cfg, seed) for name, retriever in RETRIEVERS.items()
            if retriever.fits_in_seconds or name == cfg.retriever]


def fitted_baselines(data: MovieLens, retrieval: RetrievalConfig | None = None) -> list:
    """Every baseline fitted on train + validation: the classic ones, and every registered retriever with
    `retrieval`'s settings."""
    fit_on = data.splits.train_and_validation()
    models = [cls() for cls in BASELINES] + (retrieval_baselines(retrieval) if retrieval else [])
    return [model.fit(fit_on, data.n_users, data.n_movies) for model in models]


def evaluate_baselines(data: MovieLens, k: int = K, *, evaluation: EvaluationConfig,
                       retrieval: RetrievalConfig | None = None) -> dict[str, dict[str, float]]:
    return {model.name: evaluate(model, data, k, evaluation=evaluation) for model in fitted_baselines(data, retrieval)}


def next_interactions(data: MovieLens) -> tuple[np.ndarray, np.ndarray]:
    """Each test user's first held-out rating by time (any rating: an interaction), as (users, movies)."""
    test = data.splits.test
    first = np.lexsort((np.arange(len(test)), test.timestamp, test.user))
    users = test.user[first]
    starts = np.r_[True, users[1:] != users[:-1]]
    return users[starts], test.movie[first][starts]


def sampled_metrics(score_pairs: PairScoreFn, data: MovieLens, k: int = K, seed: int = 0,
                    sample: EvaluationConfig | None = None) -> dict[str, float]:
    """The NCF paper's sampled protocol (He et al. 2017) on this split: each user's next interaction after
    training ranked among 99 movies the user never rated (in any split); HR@k and NDCG@k, over every test
    user or `sample`'s seeded sample of them. Labelled `sampled_*`: far easier than full ranking, kept to
    compare with the paper, never to choose models."""
    users, movies = next_interactions(data)
    kept = np.isin(users, sampled_users(users, sample))  # next_interactions' users are sorted and distinct
    users, movies = users[kept], movies[kept]
    everything = data.splits.train_and_validation()
    test = data.splits.test
    return sampled_ranking_metrics(score_pairs, users, movies, np.r_[everything.user, test.user],
                                   np.r_[everything.movie, test.movie], data.n_movies, k=k, seed=seed)


def gathered(score: ScoreFn) -> PairScoreFn:
    """Pair scores from a catalogue score: the candidates' entries of each user's row."""
    def pairs(users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        rows = score(users)
        rows = rows.float().numpy() if isinstance(rows, torch.Tensor) else rows
        return np.take_along_axis(np.asarray(rows, dtype=np.float64), candidates, axis=1)

    return pairs


# The original deck's own report, shown as a reference row (not re-measured).
DECK_REPORTED = {"rmse": 0.8968, "mae": 0.6870, "precision_at_10": 0.8497, "recall_at_10": 0.6362,
                 "f_at_10": 0.7276, "ndcg_at_10": 0.8851}
# Full ranking first: what users of a recommender feel. The deck's per-user test-movie ranking after.
TABLE_COLUMNS = ("full_ndcg_at_10", "full_hit_rate_at_10", "full_recall_at_10", "full_precision_at_10",
                 "full_map_at_10", "full_coverage", "full_users", "sampled_hr_at_10", "sampled_ndcg_at_10", "rmse",
                 "mae", "precision_at_10", "recall_at_10", "f_at_10", "ndcg_at_10")
COUNTS = {"full_users"}  # columns printed as whole numbers


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A fixed-width metric table; '-' where a model does not produce a metric."""
    short = {"rmse": "RMSE", "mae": "MAE", "precision_at_10": "P@10", "recall_at_10": "R@10", "f_at_10": "F@10",
             "ndcg_at_10": "NDCG@10", "full_precision_at_10": "full P@10", "full_recall_at_10": "full R@10",
             "full_ndcg_at_10": "full NDCG@10", "full_hit_rate_at_10": "full HR@10", "full_map_at_10": "full MAP@10",
             "full_coverage": "coverage", "full_users": "users ranked", "sampled_hr_at_10": "sampled HR",
             "sampled_ndcg_at_10": "sampled NDCG"}
    name_width = max(len(n) for n in rows) + 2
    lines = ["model".ljust(name_width) + "".join(f"{short[c]:>14}" for c in TABLE_COLUMNS)]
    for name, metrics in rows.items():
        cells = "".join(f"{metrics[c]:>14{'.0f' if c in COUNTS else '.4f'}}" if c in metrics else f"{'-':>14}"
                        for c in TABLE_COLUMNS)
        lines.append(name.ljust(name_width) + cells)
    return "\n".join(lines)
