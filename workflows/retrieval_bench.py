"""The retriever benchmark's measurements (`python -m jobs.bench_retrieval`): the validation grids and sweeps
that choose EASE's, ALS's and the sequence signal's settings, the chosen settings refit and scored on test, under a
global time cut, and under the NCF paper's sampled protocol. `workflows.retrieval_bench_report` writes the report.

Protocol (full ranking, exact): every catalogue movie a user has not rated is ranked; relevant = a rating of at
least `evaluation.relevant_rating`. Settings are chosen on the validation slice only (fit on train, rank against
validation); the chosen settings are then refit on train + validation and scored once on test.
"""

from __future__ import annotations

import itertools
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
from ncf.ranking import ScoreFn, SeenItems
from ncf.reranking import CandidateRetriever
from ncf.retrievers import ALS, EASE, Retriever
from ncf.retrievers.profiles import interaction_matrix
from ncf.retrievers.sequence import Sequence

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


# ----------------------------------------------------------------------------- choosing on validation


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


def choose_ease(val: Slice, max_items: int) -> tuple[dict, list[str]]:
    """Every lambda x input x scored profile (recency half-life, rating offset) on validation; B is fitted on
    the plain input, the profile only changes how users are scored."""
    rows, best = [], None
    for name, min_rating in INPUTS.items():
        x = val.matrix(min_rating)
        offsets = [o for o in PROFILE_OFFSETS if o is None or (min_rating is not None and o < min_rating)]
        profiles = {(r, o): val.matrix(min_rating, r, o) for r in (None, *RECENCY) for o in offsets}
        model = EASE(max_items=max_items, num_threads=1)
        gram = model.gram(x)
        for lam in EASE_LAMBDAS:
            model.lam = lam
            model.fit_gram(gram)
            plain, _ = val.evaluate(by_user(model, x))
            scores = {}
            for (recency, offset), profile in profiles.items():
                scores[recency, offset] = val.evaluate(by_user(model, profile))[0][NDCG]
            recency_only = {r: v for (r, o), v in scores.items() if o is None and r is not None}
            best_recency = max(recency_only, key=recency_only.get)
            by_unit = {unit: max(v for r, v in recency_only.items() if r[0] == unit) for unit in ("rank", "days")}
            best_profile = max(scores, key=scores.get)
            chosen = {"kind": "ease", "lam": lam, "input": name, "max_items": max_items,
                      "recency": best_profile[0], "offset": best_profile[1]}
            rows.append(f"| {lam:g} | {name} | {plain[NDCG]:.4f} | {plain['full_hit_rate_at_10']:.4f} | "
                        f"{best_recency[1]:g} {best_recency[0]} | {recency_only[best_recency]:.4f} | "
                        f"{by_unit['rank']:.4f} | {by_unit['days']:.4f} | "
                        f"{profile_label(chosen)} | "
                        f"{scores[best_profile]:.4f} |")
            say(f"  EASE lambda {lam:g}, {name}: NDCG {plain[NDCG]:.4f}, with recency {best_recency}: "
                f"{recency_only[best_recency]:.4f}, best profile {best_profile}: {scores[best_profile]:.4f}")
            if best is None or scores[best_profile] > best[0]:
                best = (scores[best_profile], chosen)
    return best[1] | {"validation_ndcg": best[0]}, rows


def ease_max_items_sweep(val: Slice, setting: dict) -> list[str]:
    """How much the item cap costs: the chosen setting at smaller caps, on validation."""
    rows = []
    x = val.matrix(INPUTS[setting["input"]])
    profiles = val.matrix(INPUTS[setting["input"]], setting["recency"], setting["offset"])
    n_rated = int((x.getnnz(axis=0) > 0).sum())
    for cap in (*MAX_ITEMS_SWEEP, setting["max_items"]):
        model = EASE(setting["lam"], cap, num_threads=1).fit(x)
        metrics, _ = val.evaluate(by_user(model, profiles))
        kept = len(model.items)
        rows.append(f"| {cap} | {kept} of {n_rated} | {model.item_matrix_bytes() / 2**20:.0f} MiB | "
                    f"{metrics[NDCG]:.4f} | {metrics['full_hit_rate_at_10']:.4f} |")
        say(f"  EASE max_items {cap}: kept {kept}, NDCG {metrics[NDCG]:.4f}")
    return rows


def ease_variants(val: Slice, setting: dict) -> list[str]:
    """Known EASE variants against the chosen setting, on validation, scoring the chosen profile: other fit
    matrices (each at lambda rescaled by its mean X'X diagonal, times 0.5, 1 and 2) and post-processed B."""
    min_rating = INPUTS[setting["input"]]
    profiles = val.matrix(min_rating, setting["recency"], setting["offset"])
    x = val.matrix(min_rating)
    counts = np.maximum(x.getnnz(axis=1), 1).astype(np.float32)
    fit_matrices = {"the input (the chosen setting)": x}
    if setting["recency"] is not None:
        fit_matrices[f"recency-weighted like the profile ({setting['recency'][1]:g} {setting['recency'][0]})"] = \
            val.matrix(min_rating, setting["recency"])
    if min_rating is not None:
        fit_matrices["graded, rating - 2"] = val.matrix(min_rating, offset=2.0)
        below = val.matrix(None) - x  # the ratings under the input's threshold, 1 each
        for weight in (0.1, 0.25):
            fit_matrices[f"ratings below {min_rating:g} kept at weight {weight:g}"] = x + weight * below
    for alpha in (0.25, 0.5):
        fit_matrices[f"user rows scaled by n_ratings^-{alpha:g}"] = sp.diags(counts ** -alpha) @ x

    def scored(model: EASE) -> float:
        return val.evaluate(by_user(model, profiles))[0][NDCG]

    rows, base_diag, chosen = [], None, None
    for name, matrix in fit_matrices.items():  # the chosen input first: its diagonal is the lambda scale
        model = EASE(max_items=setting["max_items"], num_threads=1)
        gram = model.gram(matrix)
        diag = float(np.diag(gram[1]).mean())
        base_diag = base_diag or diag
        results = {}
        for factor in (1.0,) if matrix is x else (0.5, 1.0, 2.0):
            model.lam = setting["lam"] * diag / base_diag * factor
            results[model.lam] = scored(model.fit_gram(gram))
        chosen = chosen or model  # the chosen setting, fitted: the B variants below start from its B
        lam = max(results, key=results.get)
        rows.append(f"| fit matrix: {name} | {lam:.3g} | {results[lam]:.4f} |")
        say(f"  EASE variant {name}: NDCG {results[lam]:.4f} at lambda {lam:.3g}")
    weights = chosen.weights
    for name, variant in (("B's negative weights set to 0", np.maximum(weights, 0)),
                          ("B kept to the 200 largest absolute weights of each column", top_per_column(weights, 200))):
        chosen.weights = variant
        ndcg = scored(chosen)
        rows.append(f"| {name} | {setting['lam']:g} | {ndcg:.4f} |")
        say(f"  EASE variant {name}: NDCG {ndcg:.4f}")
    return rows


def top_per_column(weights: np.ndarray, k: int) -> np.ndarray:
    """`weights` with all but each column's k largest absolute values set to 0."""
    if k >= weights.shape[0]:
        return weights.copy()
    cut = -np.partition(-np.abs(weights), k - 1, axis=0)[k - 1]
    return np.where(np.abs(weights) >= cut[None, :], weights, 0).astype(weights.dtype)


def choose_als(val: Slice) -> tuple[dict, list[str]]:
    rows, best = [], None
    for name, min_rating in INPUTS.items():
        x = val.matrix(min_rating)
        for factors in ALS_FACTORS:
            for reg in ALS_REGS:
                started = time.perf_counter()
                model = ALS(factors, reg, alpha=1.0, iterations=15, seed=0, num_threads=1).fit(x)
                seconds = time.perf_counter() - started
                metrics, _ = val.evaluate(by_user(model, x))
                rows.append(f"| {factors} | {reg:g} | {name} | {metrics[NDCG]:.4f} | "
                            f"{metrics['full_hit_rate_at_10']:.4f} | {seconds:.2f} |")
                say(f"  ALS {factors} factors, reg {reg:g}, {name}: NDCG {metrics[NDCG]:.4f} ({seconds:.1f} s)")
                if best is None or metrics[NDCG] > best[0]:
                    best = (metrics[NDCG], {"kind": "als", "factors": factors, "reg": reg, "input": name})
    return best[1] | {"validation_ndcg": best[0]}, rows


def choose_sequence(val: Slice, ease_setting: dict) -> tuple[dict, list[str]]:
    """The sequence signal's settings, blended into the chosen EASE as the served retriever blends them
    (`ncf.reranking.CandidateRetriever`), on validation: one row per window x most recent ratings, with its
    best decay and weight."""
    ease = build(ease_setting, val)()
    rows, best = [], None
    for window, last in itertools.product(SEQUENCE_WINDOWS, SEQUENCE_LAST):
        scores = {}
        for decay in SEQUENCE_DECAYS:
            sequence = Sequence(window, last, decay).fit(val.fit_on, val.n_movies)
            for weight in SEQUENCE_WEIGHTS:
                retriever = CandidateRetriever(ease, stage_config(ease_setting, weight), val.fit_on, val.n_users,
                                               val.n_movies, sequence)
                scores[decay, weight] = val.evaluate(retriever.score)[0][NDCG]
        decay, weight = max(scores, key=scores.get)
        rows.append(f"| {window} | {last} | {decay:g} | {weight:g} | {scores[decay, weight]:.4f} |")
        say(f"  sequence window {window}, last {last}: NDCG {scores[decay, weight]:.4f} at decay {decay:g}, "
            f"weight {weight:g}")
        if best is None or scores[decay, weight] > best[0]:
            best = (scores[decay, weight], {"window": window, "last": last, "decay": decay, "weight": weight})
    return best[1] | {"validation_ndcg": best[0]}, rows


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
    everything = Ratings(*(np.concatenate([getattr(s.train_and_validation(), f), getattr(s.test, f)])
                           for f in ("user", "movie", "rating", "timestamp")))
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


def choose_on_validation(val: Slice, max_items: int) -> Chosen:
    say("EASE grid on validation")
    ease_setting, ease_rows = choose_ease(val, max_items)
    say(f"  chosen: {label(ease_setting)} (validation NDCG {ease_setting['validation_ndcg']:.4f})")
    cap_rows = ease_max_items_sweep(val, ease_setting)
    variant_rows = ease_variants(val, ease_setting)
    say("Sequence signal on validation, blended into the chosen EASE")
    sequence_setting, sequence_rows = choose_sequence(val, ease_setting)
    say(f"  chosen: {sequence_label(sequence_setting)} (validation NDCG {sequence_setting['validation_ndcg']:.4f})")
    say("ALS grid on validation")
    als_setting, als_rows = choose_als(val)
    say(f"  chosen: {label(als_setting)} (validation NDCG {als_setting['validation_ndcg']:.4f})")
    return Chosen(max_items, ease_setting, ease_rows, cap_rows, variant_rows, sequence_setting, sequence_rows,
                  als_setting, als_rows)


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
