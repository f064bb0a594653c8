"""The retriever benchmark's report (docs/benchmarks/retrieval.md): the test table with paired bootstrap intervals,
the chosen settings, the temporal and sampled protocols, and every validation grid behind the choices."""

from __future__ import annotations

import platform

import numpy as np

from ncf.data import MovieLens
from ncf.metrics import paired_bootstrap
from workflows.retrieval_bench import (
    MAX_ITEMS,
    PROFILE_OFFSETS,
    RECENCY,
    SEQUENCE_DECAYS,
    SEQUENCE_WEIGHTS,
    Chosen,
    Slice,
)


def report(data: MovieLens, val: Slice, test: Slice, chosen: Chosen, results: dict[str, dict],
           temporal_rows: list[str], sampled: dict[str, dict[str, float]], elapsed: float) -> str:
    """The report's Markdown: `results` of `test_results`, `temporal_rows`, `sampled` of `sampled_protocol`."""
    ease_setting, als_setting, sequence_setting, max_items = chosen.ease, chosen.als, chosen.sequence, chosen.max_items
    ease_kept, ease_item_bytes = results["ease"]["items_kept"], results["ease"]["item_bytes"]
    rated_items = int((test.matrix(None).getnnz(axis=0) > 0).sum())
    command = "python -m jobs.bench_retrieval --data-dir <ml-latest-small folder>" + (
        f" --max-items {max_items}" if max_items != MAX_ITEMS else "")
    lines = [
        "# Retrieval: EASE, ALS and the sequence signal on full ranking",
        "",
        f"Produced by `{command}` (MovieLens latest-small, seed split) on {platform.machine()}, "
        f"Python {platform.python_version()}, in {elapsed:.0f} s.",
        "",
        "Protocol: full ranking, exact. Per user with a relevant item, every catalogue movie the user has not "
        "rated in the fit data is ranked; relevant = rating >= "
        f"{test.evaluation.relevant_rating:g}; @10. Settings are chosen on the validation "
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
        f"Fit on train, ranked against validation ({val.n_ranked_users()} users), max_items {max_items}. B is fit "
        "on the plain input; recency and rating offset reweight only the scored profile: each kept rating "
        "weighs 0.5 ** (age / half-life), age counted in ratings newer (rank) or in days, times rating - offset. "
        f"The best of half-lives {', '.join(f'{h:g} {u}' for u, h in RECENCY)} is shown, the best of each unit, "
        f"and the best profile of every half-life (or none) with every offset of "
        f"{', '.join('none' if o is None else f'{o:g}' for o in PROFILE_OFFSETS)} below the input's lowest rating.",
        "",
        "| lambda | input | NDCG@10 | HR@10 | best recency | NDCG@10 with it | best rank | best days | best profile "
        "| NDCG@10 with it |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *chosen.ease_rows,
        "",
        "Item cap, chosen setting:",
        "",
        "| max_items | movies kept | B | NDCG@10 | HR@10 |",
        "|---|---|---|---|---|",
        *chosen.cap_rows,
        "",
        "Variants of the chosen setting, scored with the same profile; the product offers none of them. A fit "
        "matrix other than the input is scored at lambda rescaled by its mean X'X diagonal, times 0.5, 1 and 2 "
        "(the best shown):",
        "",
        "| variant | lambda | NDCG@10 |",
        "|---|---|---|",
        *chosen.variant_rows,
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
        *chosen.sequence_rows,
        "",
        "## Validation: ALS grid",
        "",
        "alpha 1, 15 iterations, seed 0, one thread.",
        "",
        "| factors | regularization | input | NDCG@10 | HR@10 | fit s |",
        "|---|---|---|---|---|---|",
        *chosen.als_rows,
        "",
    ]
    return "\n".join(lines)
