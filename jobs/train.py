"""Train the NCF model, evaluate it next to the baselines, track and register it.

    python -m jobs.train [--launcher ray|local] [--preset NAME] [--set section.key=value ...]

`ray` (default) runs the training loop under Ray Train's TorchTrainer with
`train.num_workers` data-parallel workers; `local` runs the same loop in this
process. Either way the run lands in MLflow with its test metrics, plots and a
registered `ncf-movielens` model version (which becomes `champion` if its
`registry.champion_metric` on validation beats the champion's, or if there is none yet), and
`reports/metrics.json` is written (under the working directory, like the default MLflow
store `mlruns/`).
"""

from __future__ import annotations

import sys

from ncf.config import ConfigError, load_config, override_parser
from ncf.files import WriteError
from ncf.training.checkpoints import CheckpointError
from workflows.training_run import train_and_publish


def main(argv: list[str] | None = None) -> int:
    p = override_parser(__doc__.splitlines()[0])
    p.add_argument("--launcher", choices=("ray", "local"), default="ray")
    args = p.parse_args(argv)
    try:
        train_and_publish(load_config(args.overrides, preset=args.preset), launcher=args.launcher)
    # A path that cannot be written or read back, a config the cluster cannot run: the error alone, no traceback.
    except (WriteError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
