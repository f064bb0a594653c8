"""The history model's benchmark (`make bench-history`): its settings chosen on the validation slice, then, refit
on train + validation with 3 seeds, scored once on test alone and blended with the sequence signal, side by side
with the EASE retriever of the recommender preset, with paired bootstrap intervals.

Protocol (full ranking, exact, as `workflows.retrieval_bench`): every movie a user has not rated in the fit data is
ranked; relevant = a rating of at least `evaluation.relevant_rating`.
"""

from __future__ import annotations

import itertools
import platform
import time
from dataclasses import dataclass

import numpy as np

from ncf.config import Config
from ncf.metrics import paired_bootstrap
from ncf.ranking import candidate_retriever
from ncf.retrievers import Retriever
from ncf.retrievers.matrices import fit_on_ratings
from workflows.retrieval_bench import NDCG, Slice, say

# The validation grid: the network (width, input dropout), then the profile's recency and the sequence weight,
# which need no refit. The objective, the input, epochs and learning rate were settled earlier on the same slice
# (the README's history model section): whole-profile denoising of the liked movies, 100 epochs at 3e-3.
DIMENSIONS = (256, 600)
ITEM_DROPOUTS = (0.3, 0.5, 0.7)
RECENCY_HALF_LIVES = (None, 50.0, 200.0)
SEQUENCE_WEIGHTS = (0.0, 0.2, 0.4, 0.7)
SEEDS = (0, 1, 2)


@dataclass
class Measured:
    """One scored ranking: the summary metrics and the per-user NDCG@10."""

    metrics: dict[str, float]
    ndcg: np.ndarray


def with_settings(config: Config, dimension: int, item_dropout: float, half_life: float | None,
                  sequence_weight: float) -> Config:
    retrieval = config.retrieval
    history = retrieval.history.model_copy(update={"dimension": dimension, "item_dropout": item_dropout})
    sequence = retrieval.sequence.model_copy(update={"weight": sequence_weight})
    return config.model_copy(update={"retrieval": retrieval.model_copy(update={
        "retriever": "history", "history": history, "recency_half_life": half_life, "sequence": sequence})})


def measure(model: Retriever, config: Config, part: Slice) -> Measured:
    """`model` as the served retrieval stage ranks (profiles, fallback, the configured sequence weight)."""
    stage = candidate_retriever(model, config.retrieval, part.fit_on, part.n_users, part.n_movies)
    return Measured(*part.evaluate(stage.score))


def fit(config: Config, part: Slice, seed: int = 0) -> tuple[Retriever, float]:
    started = time.perf_counter()
    model = fit_on_ratings(config.retrieval.retriever, config.retrieval, part.fit_on, part.n_users, part.n_movies,
                           seed)
    return model, time.perf_counter() - started


def choose(config: Config, val: Slice) -> tuple[Config, list[str]]:
    """The validation grid (fit on train, ranked against validation): the best width and dropout by NDCG@10 with
    each one's best recency, then the sequence weight; the grid's rows for the report."""
    rows, best = [], (-1.0, None)
    for dimension, dropout in itertools.product(DIMENSIONS, ITEM_DROPOUTS):
        setting = with_settings(config, dimension, dropout, None, 0.0)
        model, seconds = fit(setting, val)
        for half_life in RECENCY_HALF_LIVES:
            candidate = with_settings(config, dimension, dropout, half_life, 0.0)
            ndcg = measure(model, candidate, val).metrics[NDCG]
            rows.append(f"| {dimension} | {dropout:g} | {half_life or 'none'} | 0 | {ndcg:.4f} | {seconds:.0f} |")
            say(rows[-1])
            best = max(best, (ndcg, (dimension, dropout, half_life, model)), key=lambda pair: pair[0])
    dimension, dropout, half_life, model = best[1]
    best_weight = (best[0], 0.0)
    for weight in SEQUENCE_WEIGHTS[1:]:
        ndcg = measure(model, with_settings(config, dimension, dropout, half_life, weight), val).metrics[NDCG]
        rows.append(f"| {dimension} | {dropout:g} | {half_life or 'none'} | {weight:g} | {ndcg:.4f} | - |")
        say(rows[-1])
        best_weight = max(best_weight, (ndcg, weight))
    return with_settings(config, dimension, dropout, half_life, best_weight[1]), rows


def without_sequence(config: Config) -> Config:
    return config.model_copy(update={"retrieval": config.retrieval.without_sequence()})


def test_rows(chosen: Config, ease: Config, test: Slice) -> list[str]:
    """Refit on train + validation and scored once on test: EASE as the recommender preset serves it, alone and
    with its sequence signal; the chosen history model with each seed, alone and with the chosen sequence
    signal. Rows with mean over seeds and seed 0's paired interval against EASE (the same blend)."""
    ease_model, ease_seconds = fit(ease, test)
    reference = {"alone": measure(ease_model, without_sequence(ease), test), "sequence": measure(ease_model, ease,
                                                                                                  test)}
    runs: dict[str, list[Measured]] = {"alone": [], "sequence": []}
    seconds = []
    for seed in SEEDS:
        model, took = fit(chosen, test, seed)
        seconds.append(took)
        runs["alone"].append(measure(model, without_sequence(chosen), test))
        runs["sequence"].append(measure(model, chosen, test))
        say(f"seed {seed}: alone {runs['alone'][-1].metrics[NDCG]:.4f}, "
            f"with the sequence signal {runs['sequence'][-1].metrics[NDCG]:.4f} ({took:.0f} s)")
    rows = []
    for blend, label in (("alone", "alone"), ("sequence", "+ sequence signal")):
        ease_m = reference[blend].metrics
        rows.append(f"| EASE {label} | {ease_m[NDCG]:.4f} | - | {ease_m['full_hit_rate_at_10']:.4f} | "
                    f"{ease_m['full_recall_at_10']:.4f} | {ease_m['full_coverage']:.4f} | - | {ease_seconds:.1f} |")
        values = np.array([m.metrics[NDCG] for m in runs[blend]])
        diff = paired_bootstrap(runs[blend][0].ndcg, reference[blend].ndcg)
        first = runs[blend][0].metrics
        rows.append(f"| history {label} | {values.mean():.4f} ± {values.std(ddof=1):.4f} | "
                    f"{diff.difference:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}] | "
                    f"{first['full_hit_rate_at_10']:.4f} | {first['full_recall_at_10']:.4f} | "
                    f"{first['full_coverage']:.4f} | {', '.join(f'{v:.4f}' for v in values)} | "
                    f"{np.mean(seconds):.0f} |")
    return rows


def report(chosen: Config, grid: list[str], rows: list[str], test: Slice, elapsed: float) -> str:
    h = chosen.retrieval.history
    return "\n".join([
        "# The history model on full ranking",
        "",
        f"Produced by `make bench-history` (MovieLens latest-small, seed split) on {platform.machine()}, "
        f"Python {platform.python_version()}, in {elapsed:.0f} s, on a shared 2-core machine (times indicative).",
        "",
        "Protocol: full ranking, exact; relevant = rating >= "
        f"{test.evaluation.relevant_rating:g}; @10; {test.n_ranked_users()} test users. Settings chosen on the "
        "validation slice (fit on train); refit on train + validation and scored once on test. EASE is the "
        "recommender preset's retriever (lambda 100, ratings >= 4, recency half-life 200, profile weight "
        "rating - 2) with its sequence weight 0.7. Intervals: 95% paired bootstrap over users of seed 0's "
        "model against EASE with the same blend.",
        "",
        "## Test",
        "",
        "| retrieval | NDCG@10 (mean ± sd over seeds 0-2) | - EASE [95% CI] | HR@10 | Recall@10 | coverage "
        "| NDCG@10 per seed | fit s |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Chosen: dimension {h.dimension}, item dropout {h.item_dropout:g}, {h.epochs} epochs at learning rate "
        f"{h.learning_rate:g}, {h.batch_users} users per step, recency half-life "
        f"{chosen.retrieval.recency_half_life or 'none'} (rank), profile weight rating - "
        f"{chosen.retrieval.profile_rating_offset:g}, sequence weight {chosen.retrieval.sequence.weight:g}.",
        "",
        "## Validation grid (fit on train)",
        "",
        "| dimension | item dropout | recency half-life | sequence weight | NDCG@10 | fit s |",
        "|---|---|---|---|---|---|",
        *grid,
        "",
    ])
