"""Train the NCF model, evaluate it next to the baselines, track and register it.

    python -m jobs.train [--launcher ray|local] [--set section.key=value ...]

`ray` (default) runs the training loop under Ray Train's TorchTrainer with
`train.num_workers` data-parallel workers; `local` runs the same loop in this
process. Either way the run lands in MLflow with its test metrics, plots and a
registered `ncf-movielens` model version (which becomes `champion` if its
validation RMSE beats the champion's, or if there is none yet), and
`reports/metrics.json` is written (under the working directory, like the default MLflow
store `mlruns/`).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mlflow

from jobs.publish import RunSummary, finish_run, log_data_tags, write_report
from ncf.config import Config, load_config, override_parser
from ncf.data import load_movielens, resolve_data_dir
from ncf.integrations import mlflow_tracking
from ncf.integrations.ray_train import fit_with_ray
from ncf.training import fit_in_process

REPORT_PATH = Path("reports") / "metrics.json"  # under the working directory


def run(config: Config, launcher: str = "ray", report_path: Path | None = REPORT_PATH,
        run_name: str | None = None) -> tuple[RunSummary, bool]:
    """Train, evaluate, log, register; returns the summary and whether it became champion."""
    config = config.model_copy(deep=True)
    config.data.dir = str(resolve_data_dir(config.data))  # workers load the same verified files
    data = load_movielens(config.data)
    mlflow_tracking.setup()
    with mlflow.start_run(run_name=run_name, log_system_metrics=True, tags={"launcher": launcher}) as active:
        mlflow_tracking.log_config(config)
        log_data_tags(data)
        with tempfile.TemporaryDirectory(prefix="ncf-run-") as tmp:
            if launcher == "ray":
                checkpoint = fit_with_ray(config, active.info.run_id)
            else:
                checkpoint = fit_in_process(config, data, Path(tmp) / "checkpoint",
                                            on_epoch=mlflow_tracking.EpochLogger(active.info.run_id))
            summary = finish_run(config, data, checkpoint)
        decision = mlflow_tracking.promote_if_better(summary.model_version, summary.best_val_rmse)
        mlflow.set_tags(decision)
    promoted = decision["champion.decision"] == "promoted"
    print(f"MLflow run {summary.run_id}: model {mlflow_tracking.MODEL_NAME} version {summary.model_version} (val RMSE "
          f"{decision['champion.candidate_val_rmse']}) " + ("is the champion" if promoted else
          f"does not beat champion version {decision['champion.incumbent_version']} "
          f"(val RMSE {decision['champion.incumbent_val_rmse']})"))
    if report_path:
        write_report(summary, data, report_path)
    return summary, promoted


def main(argv: list[str] | None = None) -> int:
    p = override_parser(__doc__.splitlines()[0])
    p.add_argument("--launcher", choices=("ray", "local"), default="ray")
    args = p.parse_args(argv)
    run(load_config(args.overrides), launcher=args.launcher)
    return 0


if __name__ == "__main__":
    sys.exit(main())
