"""The retriever benchmark's validation grids and sweeps (`python -m jobs.bench_retrieval`): EASE's lambda x input x
scored profile, its item cap and variants, ALS's factors x regularisation, the sequence signal blended into the
chosen EASE; each fit on train and ranked against validation, never the test split."""

from __future__ import annotations

import itertools
import time

import numpy as np
import scipy.sparse as sp

from ncf.ranking import CandidateRetriever
from ncf.retrievers import ALS, EASE
from ncf.retrievers.sequence import Sequence
from workflows.retrieval_bench import (
    ALS_FACTORS,
    ALS_REGS,
    EASE_LAMBDAS,
    INPUTS,
    MAX_ITEMS_SWEEP,
    NDCG,
    PROFILE_OFFSETS,
    RECENCY,
    SEQUENCE_DECAYS,
    SEQUENCE_LAST,
    SEQUENCE_WEIGHTS,
    SEQUENCE_WINDOWS,
    Chosen,
    Slice,
    build,
    by_user,
    label,
    profile_label,
    say,
    sequence_label,
    stage_config,
)


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
