"""Peers side by side: most-popular, EASE, ALS, item-kNN, SASRec and the served presets, each a run of the MLflow
experiment `peers`, scored with the project's own full-ranking code.

    python -m jobs.peers [--protocol seed|temporal ...] [--peers NAME ...] [--sasrec-python .venv-peers/bin/python]
                         [--sasrec-epochs 50 100 200] [--data-dir DIR] [--set section.key=value ...]

Settings are chosen on validation, refit on train + validation and scored once on test (`workflows.peers`).
SASRec needs the peers virtualenv (`make peers` builds it): without --sasrec-python it is left out. The rows
measured replace theirs in docs/benchmarks/peers.json, and docs/benchmarks/peers.md is written from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ncf.config import load_config
from ncf.data import resolve_data_dir
from workflows.peers import PEERS, Protocol, say
from workflows.peers_report import write
from workflows.peers_runs import measure_protocol
from workflows.peers_sasrec import EPOCHS, sasrec

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", nargs="+", choices=("seed", "temporal"), default=["seed"],
                        help="data.split.protocol of each table (default: seed)")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS), help="the peers to measure")
    parser.add_argument("--sasrec-python", type=Path, default=None,
                        help="the peers virtualenv's python (rectools); without it SASRec is left out")
    parser.add_argument("--sasrec-epochs", nargs="+", type=int, default=list(EPOCHS),
                        help="SASRec's training lengths, chosen on validation (default: %(default)s)")
    parser.add_argument("--data-dir", default=os.environ.get("NCF_DATA_DIR"),
                        help="MovieLens latest-small folder (default: NCF_DATA_DIR, else data.dir or the download)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override for every peer and preset, e.g. --set train.max_epochs=1")
    parser.add_argument("--record", type=Path, default=BENCHMARKS / "peers.json")
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "peers.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per preset's model read back
    if args.sasrec_python is not None and not args.sasrec_python.exists():
        parser.error(f"{args.sasrec_python} does not exist: `make peers` builds the peers virtualenv")
    peers = [peer for peer in args.peers if peer != "sasrec" or args.sasrec_python is not None]

    folder = Path(args.data_dir) if args.data_dir else resolve_data_dir(load_config(args.overrides).data)
    for protocol in args.protocol:
        started = time.perf_counter()
        p = Protocol.load(protocol, folder, args.overrides)
        fit_sasrec = sasrec(args.sasrec_python, tuple(sorted(args.sasrec_epochs))) if args.sasrec_python else None
        record = measure_protocol(p, peers, fit_sasrec)
        seconds = time.perf_counter() - started
        say(f"{protocol}: {len(record)} peers in {seconds:.0f} s")
        write(args.record, args.out, protocol, record, {"peers": ", ".join(record), "seconds": seconds,
                                                         "test_users": p.test.n_ranked_users()})
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
