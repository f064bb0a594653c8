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
import tempfile
from pathlib import Path

import mlflow

from jobs.publish import RunSummary, finish_run, gate, log_data_tags, write_report
from ncf.config import Config, ConfigError, load_config, override_parser
from ncf.data import resolve_data_dir
from ncf.files import WriteError, check_writable
from ncf.integrations import mlflow_tracking
from ncf.integrations.ray_train import fit_with_ray
from ncf.prepared import load_movielens
from ncf.training.checkpoints import CheckpointError
from ncf.training.loop import fit_in_process

REPORT_PATH = Path("reports") / "metrics.json"  # under the working directory


def run(config: Config, launcher: str = "ray", report_path: Path | None = REPORT_PATH,
        run_name: str | None = None) -> tuple[RunSummary, bool]:
    """Train, evaluate, log, register; returns the summary and whether it became champion.

    An unwritable report folder stops the job here, before any training (a WriteError naming it)."""
    if report_path:
        check_writable(report_path.parent, "report")
    config = config.model_copy(deep=True)
    config.data.dir = str(resolve_data_dir(config.data))  # workers load the same verified files
    data = load_movielens(config.data)
    mlflow_tracking.setup()
    with mlflow.start_run(run_name=run_name, log_system_metrics=True, tags={"launcher": launcher}) as active:
        mlflow_tracking.log_config(config)
        log_data_tags(data)
        with tempfile.TemporaryDirectory(prefix="ncf-run-") as tmp:
            if launcher == "ray":
                checkpoint = fit_with_ray(config, active.info.run_id, Path(tmp) / "checkpoint")
            else:
                epochs = mlflow_tracking.EpochLogger(active.info.run_id)
                checkpoint = fit_in_process(config, data, Path(tmp) / "checkpoint", on_epoch=epochs)
                epochs.flush()  # the epochs' metrics buffered while the store was unreachable
            summary = finish_run(config, data, checkpoint)
        decision = gate(summary, config)
    promoted = decision["champion.decision"] == "promoted"
    print(f"MLflow run {summary.run_id}: model {summary.model_name} version {summary.model_version} "
          f"({decision['champion.metric']} {decision['champion.candidate_value']}) " + (
              "is the champion" if promoted else f"does not beat champion version "
              f"{decision['champion.incumbent_version']} ({decision['champion.incumbent_value']})"))
    if report_path:
        write_report(summary, data, report_path)
    return summary, promoted


def main(argv: list[str] | None = None) -> int:
    p = override_parser(__doc__.splitlines()[0])
    p.add_argument("--launcher", choices=("ray", "local"), default="ray")
    args = p.parse_args(argv)
    try:
        run(load_config(args.overrides, preset=args.preset), launcher=args.launcher)
    # A path that cannot be written or read back, a config the cluster cannot run: the error alone, no traceback.
    except (WriteError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
