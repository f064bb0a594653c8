"""Search hyperparameters (Ray Tune + Optuna TPE + ASHA), register the best model, promote it if better.

    python -m jobs.tune [--set section.key=value ...]     a new sweep (conf/tune.yaml)
    python -m jobs.tune --resume [NAME]                   continue an interrupted sweep (default: the newest)

Each trial is a child MLflow run of the sweep's run. The best trial is refit, evaluated on
the test split, registered as an `ncf-movielens` version and made `champion` only if its
validation RMSE beats the champion's. The sweep's report (leaderboard, ASHA savings, test
metrics) is printed and written to `reports/tune.md`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.cli import config_from, parser
from ncf.config import REPO_ROOT
from ncf.tune import SweepError, SweepInterrupted, sweep

REPORT_PATH = REPO_ROOT / "reports" / "tune.md"
INTERRUPTED = 130  # the shell's code for Ctrl-C: the sweep can be resumed


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="NAME",
                   help="continue an interrupted sweep with its own saved config (NAME: its folder under "
                        "train.checkpoint_dir; default: the newest there)")
    p.add_argument("--report", type=Path, default=REPORT_PATH, help="where to write the sweep's Markdown report")
    args = p.parse_args(argv)
    try:
        outcome = sweep(config_from(args), resume=args.resume)
    except SweepInterrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        return INTERRUPTED
    except SweepError as problem:
        print(problem, file=sys.stderr, flush=True)
        return 2
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(outcome.report())
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
