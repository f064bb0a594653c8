"""Retriever benchmark: EASE, ALS and the sequence signal, settings chosen on validation, measured once on test.

    python -m jobs.bench_retrieval [--data-dir DIR] [--max-items 8000] [--out docs/benchmarks/retrieval.md]

Protocol (full ranking, exact): every catalogue movie a user has not rated is ranked;
relevant = rating >= 4. Settings are chosen on the validation slice only (fit on train,
rank against validation); the chosen settings are then refit on train + validation and
scored once on test, with a paired bootstrap interval over users. The NCF paper's sampled
protocol (leave-one-out, 99 negatives) is reported beside it for comparison with the literature.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ncf.baselines import MostPopular
from ncf.config import RetrievalConfig, load_config
from ncf.data import MovieLens, Ratings, resolve_data_dir
from ncf.evaluation import full_ranking_against, score_ranker
from ncf.files import write_atomically
from ncf.metrics import leave_one_out, paired_bootstrap, sampled_ranking_metrics
from ncf.prepared import load_movielens
from ncf.ranking import CandidateRetriever, ScoreFn
from ncf.retrievers import ALS, EASE, Retriever
from ncf.retrievers.matrices import interaction_matrix
from ncf.retrievers.sequence import Sequence
from ncf.user_ratings import SeenItems

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "docs" / "benchmarks" / "retrieval.md"
# Wide enough that each input's best lambda is inside the grid, not at an end of it.
EASE_LAMBDAS = (50.0, 75.0, 100.0, 250.0, 500.0, 1000.0)
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

    def matrix(self, min_rating: float | None, recency: tuple[str, float] | None = None,
               offset: float | None = None) -> sp.csr_matrix:
        unit, half_life = recency or ("rank", None)
        return interaction_matrix(self.fit_on, self.n_users, self.n_movies, min_rating, half_life, unit, offset)

    def evaluate(self, score: Callable[[np.ndarray], np.ndarray]) -> tuple[dict[str, float], np.ndarray]:
        """Summary metrics and per-user NDCG@10 (rows in the order of the sorted user ids)."""
        metrics, per_user = full_ranking_against(score_ranker(score, chunk=128), self.seen, self.target,
                                                 self.n_movies)
        return metrics, per_user[NDCG]

    def n_ranked_users(self) -> int:
        return len(np.unique(self.target.user[self.target.rating >= 4.0]))


def by_user(model: Retriever, profiles: sp.csr_matrix) -> ScoreFn:
    """Score users (rows of `profiles`) with a retriever, which scores profiles."""
    return lambda users: model.score(profiles[users])


def slices(data: MovieLens) -> tuple[Slice, Slice]:
    s = data.splits
    validation = Slice(s.train, SeenItems(s.train.user, s.train.movie, data.n_users), s.validation,
                       data.n_users, data.n_movies)
    both = s.train_and_validation()
    test = Slice(both, SeenItems(both.user, both.movie, data.n_users), s.test, data.n_users, data.n_movies)
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
    (`ncf.ranking.CandidateRetriever`), on validation: one row per window x most recent ratings, with its
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


def sampled_protocol(data: MovieLens, settings: dict[str, dict]) -> dict[str, dict[str, float]]:
    """He et al.'s protocol on the same data: each user's latest rating held out, 99 never-rated negatives."""
    s = data.splits
    everything = Ratings(*(np.concatenate([getattr(s.train_and_validation(), f), getattr(s.test, f)])
                           for f in ("user", "movie", "rating", "timestamp")))
    held = leave_one_out(everything.user, everything.timestamp)
    rest, out = everything.take(np.flatnonzero(~held)), everything.take(np.flatnonzero(held))
    part = Slice(rest, SeenItems(rest.user, rest.movie, data.n_users), out, data.n_users, data.n_movies)
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


# ----------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("NCF_DATA_DIR"),
                        help="MovieLens latest-small folder (default: NCF_DATA_DIR, else data.dir or the download)")
    parser.add_argument("--max-items", type=int, default=MAX_ITEMS, help="EASE item cap during the search")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    config = load_config()
    folder = Path(args.data_dir) if args.data_dir else resolve_data_dir(config.data)
    data = load_movielens(config.data, folder)
    val, test = slices(data)
    say(f"{data.n_users} users, {data.n_movies} movies; validation: {val.n_ranked_users()} users with a relevant item, "
        f"test: {test.n_ranked_users()}")

    started = time.perf_counter()
    say("EASE grid on validation")
    ease_setting, ease_rows = choose_ease(val, args.max_items)
    say(f"  chosen: {label(ease_setting)} (validation NDCG {ease_setting['validation_ndcg']:.4f})")
    cap_rows = ease_max_items_sweep(val, ease_setting)
    variant_rows = ease_variants(val, ease_setting)
    say("Sequence signal on validation, blended into the chosen EASE")
    sequence_setting, sequence_rows = choose_sequence(val, ease_setting)
    say(f"  chosen: {sequence_label(sequence_setting)} (validation NDCG {sequence_setting['validation_ndcg']:.4f})")
    say("ALS grid on validation")
    als_setting, als_rows = choose_als(val)
    say(f"  chosen: {label(als_setting)} (validation NDCG {als_setting['validation_ndcg']:.4f})")

    say("Refit on train + validation, test")
    results: dict[str, dict] = {}
    popular = MostPopular().fit(test.fit_on, data.n_users, data.n_movies)
    metrics, ndcg = test.evaluate(popular.score)
    results["most_popular"] = {"metrics": metrics, "ndcg": ndcg, "seconds": float("nan"), "peak_mib": float("nan"),
                               "setting": "by number of ratings"}
    ease_item_bytes = 0
    ablation = ease_setting | {"recency": None, "offset": None}  # not chosen on test: what the profile adds
    for name, setting in (("ease", ease_setting), ("als", als_setting), ("ease, plain profile (ablation)", ablation)):
        model, seconds, peak = measure_fit(build(setting, test))
        metrics, ndcg = test.evaluate(by_user(model, profiles_of(setting, test)))
        results[name] = {"metrics": metrics, "ndcg": ndcg, "seconds": seconds, "peak_mib": peak,
                         "setting": label(setting)}
        if name == "ease":
            ease_item_bytes, ease_kept = model.item_matrix_bytes(), len(model.items)
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

    say("The chosen settings under a global time cut (data.split.protocol: temporal)")
    temporal_config = load_config(["data.split.protocol=temporal"])
    temporal_rows = []
    for name, part in zip(("validation", "test"), slices(load_movielens(temporal_config.data, folder)), strict=True):
        temporal_rows.append(f"| {name} | {with_and_without_sequence(part, ease_setting, sequence_setting)}")
        say(f"  temporal {name}: users, EASE, EASE + sequence, difference: {temporal_rows[-1]}")
    say("Sampled protocol (leave-one-out, 99 negatives)")
    sampled = sampled_protocol(data, {"ease": ease_setting, "als": als_setting})
    elapsed = time.perf_counter() - started

    rated_items = int((test.matrix(None).getnnz(axis=0) > 0).sum())
    command = "python -m jobs.bench_retrieval --data-dir <ml-latest-small folder>" + (
        f" --max-items {args.max_items}" if args.max_items != MAX_ITEMS else "")
    lines = [
        "# Retrieval: EASE, ALS and the sequence signal on full ranking",
        "",
        f"Produced by `{command}` (MovieLens latest-small, seed split) on {platform.machine()}, "
        f"Python {platform.python_version()}, in {elapsed:.0f} s.",
        "",
        "Protocol: full ranking, exact. Per user with a relevant item, every catalogue movie the user has not "
        "rated in the fit data is ranked; relevant = rating >= 4; @10. Settings are chosen on the validation "
        "slice only (fit on train, ranked against validation); the chosen ones are refit on train + validation "
        f"and scored once on test ({test.n_ranked_users()} users). Intervals: 95% paired bootstrap over users "
        "(2,000 resamples, seed 0).",
        "",
        "## Test (chosen settings, refit on train + validation)",
        "",
        "| model | NDCG@10 [95% CI] | vs most popular [95% CI] | HR@10 | Recall@10 | P@10 | MAP@10 | coverage "
        "| fit s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = results["most_popular"]["ndcg"]
    for name, r in results.items():
        m = r["metrics"]
        own = paired_bootstrap(r["ndcg"], np.zeros_like(r["ndcg"]))
        diff = paired_bootstrap(r["ndcg"], base) if name != "most_popular" else None
        diff_cell = f"{diff.difference:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}]" if diff else "-"
        fit_cells = "- | -" if np.isnan(r["seconds"]) else f"{r['seconds']:.2f} | {r['peak_mib']:.0f}"
        lines.append(f"| {name} | {own.difference:.4f} [{own.low:.4f}, {own.high:.4f}] | {diff_cell} | "
                     f"{m['full_hit_rate_at_10']:.4f} | {m['full_recall_at_10']:.4f} | "
                     f"{m['full_precision_at_10']:.4f} | {m['full_map_at_10']:.4f} | {m['full_coverage']:.4f} | "
                     f"{fit_cells} |")
    duel = paired_bootstrap(results["ease"]["ndcg"], results["als"]["ndcg"])
    gain = paired_bootstrap(results["ease + sequence"]["ndcg"], results["ease"]["ndcg"])
    lines += [
        "",
        f"EASE - ALS, NDCG@10: {duel.difference:+.4f} [{duel.low:+.4f}, {duel.high:+.4f}]. "
        f"EASE + sequence - EASE: {gain.difference:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}].",
        "",
        "Settings:",
        "",
        f"- ease: {results['ease']['setting']} (validation NDCG@10 {ease_setting['validation_ndcg']:.4f})",
        f"- als: {results['als']['setting']} (validation NDCG@10 {als_setting['validation_ndcg']:.4f})",
        f"- ease + sequence: the ease row's EASE, its scores blended with the {results['ease + sequence']['setting']} "
        f"(retrieval.sequence; validation NDCG@10 {sequence_setting['validation_ndcg']:.4f})",
        "",
        "Fit time: one untraced fit, BLAS and `implicit` on one thread (a shared 2-core machine: times are "
        "indicative); for ease + sequence, the sequence signal's alone. Peak: the largest traced allocation "
        "during a second fit (Python's tracemalloc, which sees numpy and scipy buffers, not `implicit`'s C++ "
        "scratch space).",
        "",
        f"EASE item matrix: B is dense float32, 4 x n^2 bytes. At ml-latest-small all {data.n_movies} movies "
        f"would take {4 * data.n_movies**2 / 2**20:.0f} MiB and the {rated_items} movies rated in train + "
        f"validation {4 * rated_items**2 / 2**20:.0f} MiB; the chosen input keeps {ease_kept} movies: "
        f"{ease_item_bytes / 2**20:.0f} MiB (fit peak above: X'X is built and inverted in place, so the peak is "
        "B plus small blocks). `max_items` bounds it to 4 x max_items^2 bytes (8000: 244 MiB, 4000: 61 MiB, "
        "2000: 15 MiB); the item-cap table below shows what a cap costs.",
        "",
        "## The sequence signal under a global time cut",
        "",
        "The seed split holds out each user's latest ratings, so other users' training ratings can come later in "
        "calendar time than a user's held-out ones, for EASE as for the sequence signal. Under one global time cut "
        "(`data.split.protocol: temporal`: the latest 20% of all ratings are test, every fit rating is older), "
        "the same chosen settings (not chosen again), fitted on train and on train + validation:",
        "",
        "| slice | users | EASE | EASE + sequence | difference [95% CI] |",
        "|---|---|---|---|---|",
        *temporal_rows,
        "",
        "`retrieval.sequence.weight` is off by default and on in the recommender preset, chosen and measured on "
        "the seed split.",
        "",
        "## Sampled protocol (He et al. 2017), for comparison with the literature",
        "",
        "Each user's latest rating held out from all data, ranked among 99 movies the user never rated "
        "(seed 0); ties count against the model; the chosen settings refit on the rest. Far easier than full "
        "ranking, so not used to choose anything.",
        "",
        "| model | sampled HR@10 | sampled NDCG@10 |",
        "|---|---|---|",
        *(f"| {n} | {v['sampled_hr_at_10']:.4f} | {v['sampled_ndcg_at_10']:.4f} |" for n, v in sampled.items()),
        "",
        "## Validation: EASE grid",
        "",
        f"Fit on train, ranked against validation ({val.n_ranked_users()} users), max_items {args.max_items}. B is fit "
        "on the plain input; recency and rating offset reweight only the scored profile: each kept rating "
        "weighs 0.5 ** (age / half-life), age counted in ratings newer (rank) or in days, times rating - offset. "
        f"The best of half-lives {', '.join(f'{h:g} {u}' for u, h in RECENCY)} is shown, the best of each unit, "
        f"and the best profile of every half-life (or none) with every offset of "
        f"{', '.join('none' if o is None else f'{o:g}' for o in PROFILE_OFFSETS)} below the input's lowest rating.",
        "",
        "| lambda | input | NDCG@10 | HR@10 | best recency | NDCG@10 with it | best rank | best days | best profile "
        "| NDCG@10 with it |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *ease_rows,
        "",
        "Item cap, chosen setting:",
        "",
        "| max_items | movies kept | B | NDCG@10 | HR@10 |",
        "|---|---|---|---|---|",
        *cap_rows,
        "",
        "Variants of the chosen setting, scored with the same profile; the product offers none of them. A fit "
        "matrix other than the input is scored at lambda rescaled by its mean X'X diagonal, times 0.5, 1 and 2 "
        "(the best shown):",
        "",
        "| variant | lambda | NDCG@10 |",
        "|---|---|---|",
        *variant_rows,
        "",
        "## Validation: the sequence signal",
        "",
        "What users rate next (`ncf.retrievers.sequence.Sequence`): for each movie, how often each other movie came "
        "within `window` ratings after it in a user's history; a user's score sums those counts over the user's `last` "
        "most recent ratings, each older one weighing `decay` times the next. Blended into the chosen EASE as "
        "z(EASE) + weight x z(sequence), fit on train, ranked against validation; the best decay "
        f"({', '.join(f'{d:g}' for d in SEQUENCE_DECAYS)}) and weight "
        f"({', '.join(f'{w:g}' for w in SEQUENCE_WEIGHTS)}) of each row is shown. The chosen EASE alone: "
        f"{ease_setting['validation_ndcg']:.4f}.",
        "",
        "| window | last | decay | weight | NDCG@10 |",
        "|---|---|---|---|---|",
        *sequence_rows,
        "",
        "## Validation: ALS grid",
        "",
        "alpha 1, 15 iterations, seed 0, one thread.",
        "",
        "| factors | regularization | input | NDCG@10 | HR@10 | fit s |",
        "|---|---|---|---|---|---|",
        *als_rows,
        "",
    ]
    write_atomically(args.out, "\n".join(lines), "report")
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
