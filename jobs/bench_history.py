"""The history model's benchmark: settings chosen on validation, 3 seeds on test beside EASE
(`workflows.history_bench`).

    python -m jobs.bench_history [--data-dir DIR] [--out docs/benchmarks/history.md]
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
from workflows.history_bench import choose, report, test_rows
from workflows.retrieval_bench import say, slices

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "history.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("NCF_DATA_DIR"),
                        help="MovieLens latest-small folder (default: NCF_DATA_DIR, else data.dir or the download)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    ease = load_config(preset="recommender")
    folder = Path(args.data_dir) if args.data_dir else resolve_data_dir(ease.data)
    data = load_movielens(ease.data, folder)
    val, test = slices(data, ease.evaluation)
    started = time.perf_counter()
    say("Validation grid (fit on train)")
    chosen, grid = choose(load_config(preset="history"), val)
    say("Refit on train + validation, test")
    rows = test_rows(chosen, ease, test)
    write_atomically(args.out, report(chosen, grid, rows, test, time.perf_counter() - started), "report")
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
