"""Retrain on the live ratings: a challenger trained on the dataset plus the ratings store's live ratings up to a cut.

    python -m jobs.retrain [--launcher ray|local] [--preset NAME] [--set section.key=value ...]

With the champion's settings (or the preset's), through the usual Ray Train path (`local`: in this process);
champion and challenger compared on validation and on the fresh hold-out (the newest live ratings); the challenger
registered, and given the alias `challenger` when it passes the offline gate (`workflows.retrain`). Exit code 2,
with the reason, when there is no champion or no live ratings.
"""

from __future__ import annotations

import sys

from ncf.config import ConfigError, override_parser
from ncf.data import DataError
from ncf.feedback_store import StoreUnavailable
from ncf.files import WriteError
from ncf.training.checkpoints import CheckpointError
from workflows.retrain import NothingToRetrain, retrain


def main(argv: list[str] | None = None) -> int:
    p = override_parser(__doc__.splitlines()[0])
    p.add_argument("--launcher", choices=("ray", "local"), default="ray")
    args = p.parse_args(argv)
    try:
        retrain(args.overrides, preset=args.preset, launcher=args.launcher)
    except (NothingToRetrain, StoreUnavailable, DataError, WriteError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
