"""Retriever benchmark: EASE, ALS and the sequence signal, settings chosen on validation, measured once on test.

    python -m jobs.bench_retrieval [--data-dir DIR] [--max-items 8000] [--out docs/benchmarks/retrieval.md]

Protocol (full ranking, exact): every catalogue movie a user has not rated is ranked; relevant = a rating of at
least `evaluation.relevant_rating` (conf/evaluation.yaml). Settings are chosen on the validation slice only (fit on
train, rank against validation); the chosen settings are then refit on train + validation and scored once on test,
with a paired bootstrap interval over users. The NCF paper's sampled protocol (leave-one-out, 99 negatives) is
reported beside it for comparison with the literature. The measurements: `workflows.retrieval_bench`; the report:
`workflows.retrieval_bench_report`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ncf.config import load_config
from ncf.data import resolve_data_dir
from ncf.files import write_atomically
from ncf.prepared import load_movielens
from workflows.retrieval_bench import (
    MAX_ITEMS,
    sampled_protocol,
    say,
    slices,
    temporal_rows,
    test_results,
)
from workflows.retrieval_bench_report import report
from workflows.retrieval_grids import choose_on_validation

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "retrieval.md"


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
    val, test = slices(data, config.evaluation)
    say(f"{data.n_users} users, {data.n_movies} movies; validation: {val.n_ranked_users()} users with a relevant item, "
        f"test: {test.n_ranked_users()}")

    started = time.perf_counter()
    chosen = choose_on_validation(val, args.max_items)
    say("Refit on train + validation, test")
    results = test_results(data, test, chosen)
    temporal = temporal_rows(folder, config.evaluation, chosen)
    say("Sampled protocol (leave-one-out, 99 negatives)")
    sampled = sampled_protocol(data, config.evaluation, {"ease": chosen.ease, "als": chosen.als})
    elapsed = time.perf_counter() - started

    write_atomically(args.out, report(data, val, test, chosen, results, temporal, sampled, elapsed), "report")
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
