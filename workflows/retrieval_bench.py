"""The retriever benchmark's measurements (`python -m jobs.bench_retrieval`): the slices, the settings the
validation grids choose among, the chosen settings refit and scored on test, under a global time cut, and under
the NCF paper's sampled protocol. The validation grids: `workflows.retrieval_grids`;
the report: `workflows.retrieval_bench_report`.

Protocol (full ranking, exact): every catalogue movie a user has not rated is ranked; relevant = a rating of at
least `evaluation.relevant_rating`. Settings are chosen on the validation slice only (fit on train, rank against
validation); the chosen settings are then refit on train + validation and scored once on test.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ncf.baselines import MostPopular
from ncf.config import EvaluationConfig, RetrievalConfig, load_config
from ncf.data import MovieLens, Ratings
from ncf.evaluation import full_ranking_against, relevant_targets, score_ranker
from ncf.metrics import leave_one_out, paired_bootstrap, sampled_ranking_metrics
from ncf.prepared import load_movielens
from ncf.ranking import CandidateRetriever, ScoreFn
from ncf.retrievers import ALS, EASE, Retriever
from ncf.retrievers.matrices import interaction_matrix
from ncf.retrievers.sequence import Sequence
from ncf.user_ratings import SeenItems

# Wide enough that each input's best lambda is inside the grid, not at an end of it.
EASE_LAMBDAS = (50.0, 75.0, 100.0, 250.0, 500.0, 1000.0)
# The retrievers' inputs searched (retrieval.min_rating): every rating as 1, or only ratings of 4 and up.
INPUTS = {"binarised": None, ">=4": 4.0}
RECENCY = (("rank", 10.0), ("rank", 25.0), ("rank", 50.0), ("rank", 100.0), ("rank", 200.0),
           ("days", 30.0), ("days", 180.0), ("days", 365.0), ("days", 1095.0))
# Profile weight rating - offset (None: every kept rating 1); only offsets below the input's lowest rating.
PROFILE_OFFSETS = (None, 2.0, 3.0, 3.5)
ALS_FACTORS = (32, 64, 128)
ALS_REGS = (1.0, 10.0, 50.0)
MAX_ITEMS = 8000
MAX_ITEMS_SWEEP = (1000, 2000, 4000)
# The sequence signal blended into the chosen EASE (retrieval.sequence): window, most recent ratings, decay, weight.
SEQUENCE_WINDOWS = (5, 10, 20)
SEQUENCE_LAST = (5, 10, 20)
SEQUENCE_DECAYS = (0.5, 0.7, 0.9)
SEQUENCE_WEIGHTS = (0.4, 0.7, 1.0)
NDCG = "full_ndcg_at_10"


def say(message: str) -> None:
    print(message, flush=True)


@dataclass
class Slice:
    """One full-ranking evaluation: fit on `fit_on`, rank what `seen` lacks, score against `target`."""

    fit_on: Ratings
    seen: SeenItems
    target: Ratings
    n_users: int
    n_movies: int
    evaluation: EvaluationConfig  # what is relevant (`evaluation.relevant_rating`) and which users are ranked

    def matrix(self, min_rating: float | None, recency: tuple[str, float] | None = None,
               offset: float | None = None) -> sp.csr_matrix:
        unit, half_life = recency or ("rank", None)
        return interaction_matrix(self.fit_on, self.n_users, self.n_movies, min_rating, half_life, unit, offset)

    def evaluate(self, score: Callable[[np.ndarray], np.ndarray]) -> tuple[dict[str, float], np.ndarray]:
        """Summary metrics and per-user NDCG@10 (rows in the order of the sorted user ids)."""
        metrics, per_user = full_ranking_against(score_ranker(score, chunk=128), self.seen, self.target,
                                                 self.n_movies, evaluation=self.evaluation)
        return metrics, per_user[NDCG]

    def n_ranked_users(self) -> int:
        return len(relevant_targets(self.target, self.evaluation)[0])


def by_user(model: Retriever, profiles: sp.csr_matrix) -> ScoreFn:
    """Score users (rows of `profiles`) with a retriever, which scores profiles."""
    return lambda users: model.score(profiles[users])


def slices(data: MovieLens, evaluation: EvaluationConfig) -> tuple[Slice, Slice]:
    """Validation (fit on train) and test (fit on train + validation)."""
    s = data.splits
    validation = Slice(s.train, SeenItems(s.train.user, s.train.movie, data.n_users), s.validation,
                       data.n_users, data.n_movies, evaluation)
    both = s.train_and_validation()
    test = Slice(both, SeenItems(both.user, both.movie, data.n_users), s.test, data.n_users, data.n_movies,
                 evaluation)
    return validation, test


# ----------------------------------------------------------------------------- settings and their labels


def label(setting: dict) -> str:
    if setting["kind"] == "ease":
        return (f"EASE lambda={setting['lam']:g}, input {setting['input']}, {profile_label(setting)}, "
                f"max_items {setting['max_items']}")
    return (f"ALS factors={setting['factors']}, reg={setting['reg']:g}, alpha=1, input {setting['input']}, "
            f"15 iterations, seed 0")


def profile_label(setting: dict) -> str:
    recency = "none" if setting["recency"] is None else f"{setting['recency'][1]:g} {setting['recency'][0]}"
    offset = setting.get("offset")
    return f"recency {recency}, profile weight " + ("1" if offset is None else f"rating - {offset:g}")


def sequence_label(setting: dict) -> str:
    return (f"sequence window {setting['window']}, last {setting['last']}, decay {setting['decay']:g}, "
            f"weight {setting['weight']:g}")


def fit_sequence(setting: dict, part: Slice) -> Sequence:
    """The sequence signal of a chosen `setting` (choose_sequence), fitted on `part`."""
    return Sequence(setting["window"], setting["last"], setting["decay"]).fit(part.fit_on, part.n_movies)


def with_and_without_sequence(part: Slice, ease_setting: dict, sequence_setting: dict) -> str:
    """A table row: NDCG@10 of the chosen EASE alone and blended with the chosen sequence signal, both fitted on
    `part` and served as the recommender serves them (users without a profile get the most rated movies), and
    their paired difference."""
    ease = build(ease_setting, part)()
    sequence = fit_sequence(sequence_setting, part)
    plain = CandidateRetriever(ease, stage_config(ease_setting), part.fit_on, part.n_users, part.n_movies)
    blended = CandidateRetriever(ease, stage_config(ease_setting, sequence_setting["weight"]), part.fit_on,
                                 part.n_users, part.n_movies, sequence)
    (alone, alone_per_user), (mixed, mixed_per_user) = part.evaluate(plain.score), part.evaluate(blended.score)
    gain = paired_bootstrap(mixed_per_user, alone_per_user)
    return (f"{part.n_ranked_users()} | {alone[NDCG]:.4f} | {mixed[NDCG]:.4f} | "
            f"{gain.difference:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}] |")


# ----------------------------------------------------------------------------- refit and test


def build(setting: dict, part: Slice) -> Callable[[], EASE | ALS]:
    x = part.matrix(INPUTS[setting["input"]])
    if setting["kind"] == "ease":
        return lambda: EASE(setting["lam"], setting["max_items"], num_threads=1).fit(x)
    return lambda: ALS(setting["factors"], setting["reg"], alpha=1.0, iterations=15, seed=0, num_threads=1).fit(x)


def profiles_of(setting: dict, part: Slice) -> sp.csr_matrix:
    """The profiles a chosen `setting` scores: EASE's weighted as chosen, ALS's the plain input."""
    if setting["kind"] == "ease":
        return part.matrix(INPUTS[setting["input"]], setting["recency"], setting["offset"])
    return part.matrix(INPUTS[setting["input"]])


def stage_config(ease_setting: dict, sequence_weight: float = 0.0) -> RetrievalConfig:
    """The retrieval section serving a chosen EASE setting (and a sequence signal of that weight) as
    `CandidateRetriever` reads it."""
    unit, half_life = ease_setting["recency"] or ("rank", None)
    cfg = load_config().retrieval
    return cfg.model_copy(update={"min_rating": INPUTS[ease_setting["input"]], "recency_unit": unit,
                                  "recency_half_life": half_life, "profile_rating_offset": ease_setting["offset"],
                                  "sequence": cfg.sequence.model_copy(update={"weight": sequence_weight})})


def measure_fit(fit: Callable[[], object]) -> tuple[object, float, float]:
    """The fitted model, fit seconds (untraced run) and peak traced allocation in MiB (a second, traced run)."""
    started = time.perf_counter()
    model = fit()
    seconds = time.perf_counter() - started
    del model
    tracemalloc.start()
    model = fit()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return model, seconds, peak / 2**20


def sampled_protocol(data: MovieLens, evaluation: EvaluationConfig, settings: dict[str, dict]) -> dict[
        str, dict[str, float]]:
    """He et al.'s protocol on the same data: each user's latest rating held out, 99 never-rated negatives."""
    s = data.splits
    everything = Ratings.concat(s.train, s.validation, s.test)
    held = leave_one_out(everything.user, everything.timestamp)
    rest, out = everything.take(np.flatnonzero(~held)), everything.take(np.flatnonzero(held))
    part = Slice(rest, SeenItems(rest.user, rest.movie, data.n_users), out, data.n_users, data.n_movies, evaluation)
    results = {}
    scorers = {name: by_user(build(setting, part)(), profiles_of(setting, part)) for name, setting in settings.items()}
    scorers["most_popular"] = MostPopular().fit(rest, data.n_users, data.n_movies).score
    for name, score in scorers.items():
        def pairs(users: np.ndarray, items: np.ndarray, score=score) -> np.ndarray:
            return np.take_along_axis(np.asarray(score(users), dtype=np.float64), items, axis=1)

        results[name] = sampled_ranking_metrics(pairs, out.user, out.movie, everything.user, everything.movie,
                                                data.n_movies, seed=0)
        say(f"  sampled {name}: {results[name]}")
    return results


@dataclass
class Chosen:
    """The settings chosen on validation and every grid's rows for the report."""

    max_items: int  # EASE's item cap during the search
    ease: dict
    ease_rows: list[str]
    cap_rows: list[str]
    variant_rows: list[str]
    sequence: dict
    sequence_rows: list[str]
    als: dict
    als_rows: list[str]


def test_results(data: MovieLens, test: Slice, chosen: Chosen) -> dict[str, dict]:
    """Each chosen setting (and most popular, and EASE without its scored profile) refit on train + validation and
    scored on test: metrics, per-user NDCG, fit seconds and peak MiB, the setting's label; EASE's row also its item
    matrix's bytes and the movies it kept."""
    ease_setting, als_setting, sequence_setting = chosen.ease, chosen.als, chosen.sequence


    results: dict[str, dict] = {}
    popular = MostPopular().fit(test.fit_on, data.n_users, data.n_movies)
    metrics, ndcg = test.evaluate(popular.score)
    results["most_popular"] = {"metrics": metrics, "ndcg": ndcg, "seconds": float("nan"), "peak_mib": float("nan"),
                               "setting": "by number of ratings"}
    ablation = ease_setting | {"recency": None, "offset": None}  # not chosen on test: what the profile adds
    for name, setting in (("ease", ease_setting), ("als", als_setting), ("ease, plain profile (ablation)", ablation)):
        model, seconds, peak = measure_fit(build(setting, test))
        metrics, ndcg = test.evaluate(by_user(model, profiles_of(setting, test)))
        results[name] = {"metrics": metrics, "ndcg": ndcg, "seconds": seconds, "peak_mib": peak,
                         "setting": label(setting)}
        if name == "ease":
            results[name] |= {"item_bytes": model.item_matrix_bytes(), "items_kept": len(model.items)}
        say(f"  {name}: NDCG {metrics[NDCG]:.4f}, HR {metrics['full_hit_rate_at_10']:.4f}, fit {seconds:.2f} s, "
            f"peak {peak:.0f} MiB")
        if name == "ease":
            ease_model = model
    sequence, seconds, peak = measure_fit(lambda: fit_sequence(sequence_setting, test))
    blended = CandidateRetriever(ease_model, stage_config(ease_setting, sequence_setting["weight"]), test.fit_on,
                                 data.n_users, data.n_movies, sequence)
    metrics, ndcg = test.evaluate(blended.score)
    results["ease + sequence"] = {"metrics": metrics, "ndcg": ndcg, "seconds": seconds, "peak_mib": peak,
                                  "setting": sequence_label(sequence_setting)}
    say(f"  ease + sequence: NDCG {metrics[NDCG]:.4f}, HR {metrics['full_hit_rate_at_10']:.4f}, sequence fit "
        f"{seconds:.2f} s, peak {peak:.0f} MiB")
    return results


def temporal_rows(folder: Path, evaluation: EvaluationConfig, chosen: Chosen) -> list[str]:
    """The chosen EASE with and without the sequence signal under a global time cut (data.split.protocol:
    temporal), one report row per slice."""
    say("The chosen settings under a global time cut (data.split.protocol: temporal)")
    temporal_data = load_config(["data.split.protocol=temporal"]).data
    rows = []
    for name, part in zip(("validation", "test"), slices(load_movielens(temporal_data, folder), evaluation),
                          strict=True):
        rows.append(f"| {name} | {with_and_without_sequence(part, chosen.ease, chosen.sequence)}")
        say(f"  temporal {name}: users, EASE, EASE + sequence, difference: {rows[-1]}")
    return rows
