"""One training run end to end, whoever starts it (`make train`, the serving benchmark when it needs a model):
train (Ray Train or in-process), publish (`workflows.publish`), the champion gate, the metric report. `make retrain`
trains in a run of its own the same way (`train_in_run`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from ncf.config import Config
from ncf.data import MovieLens, resolve_data_dir
from ncf.files import check_writable
from ncf.integrations import mlflow_tracking
from ncf.integrations.ray_train import fit_with_ray
from ncf.prepared import load_movielens
from ncf.training.loop import fit_in_process
from workflows.champion import gate
from workflows.publish import RunSummary, finish_run, log_data_tags, write_report

REPORT_PATH = Path("reports") / "metrics.json"  # under the working directory


def train_and_publish(config: Config, launcher: str = "ray", report_path: Path | None = REPORT_PATH,
                      job: str = "train") -> tuple[RunSummary, bool]:
    """Train, evaluate, log, register; returns the summary and whether it became champion. The run is named by
    what it is: `job`, the preset and the dataset (`mlflow_tracking.run_name`).

    An unwritable report folder stops the job here, before any training (a WriteError naming it)."""
    if report_path:
        check_writable(report_path.parent, "report")
    data_dir = resolve_data_dir(config.data)  # the driver and every worker load the same verified files
    data = load_movielens(config.data, data_dir)
    mlflow_tracking.setup()
    with mlflow.start_run(run_name=mlflow_tracking.run_name(job, config), log_system_metrics=True,
                          tags={"launcher": launcher}) as active:
        summary = train_in_run(config, data, data_dir, launcher, active.info.run_id)
        decision = gate(summary, config)
    promoted = decision["champion.decision"] == "promoted"
    print(f"MLflow run {summary.run_id}: model {summary.model_name} version {summary.model_version} "
          f"({decision['champion.metric']} {decision['champion.candidate_value']}) " + (
              "is the champion" if promoted else f"does not beat champion version "
              f"{decision['champion.incumbent_version']} ({decision['champion.incumbent_value']})"))
    if report_path:
        write_report(summary, data, report_path)
    return summary, promoted


def train_in_run(config: Config, data: MovieLens, data_dir: Path, launcher: str, run_id: str,
                 register: bool = True) -> RunSummary:
    """In the active MLflow run `run_id`: log the config and data, train (Ray Train's workers load `data_dir`'s
    prepared copy, as `data` was), publish and register (`finish_run`; `register=False` logs the model in the run
    only, as `make peers` does). What decides the version's alias is the caller's: the champion gate (`make
    train`), the offline gate (`make retrain`)."""
    mlflow_tracking.log_config(config)
    log_data_tags(data)
    mlflow_tracking.log_data_inputs(data, config)
    with tempfile.TemporaryDirectory(prefix="ncf-run-") as tmp:
        if launcher == "ray":
            checkpoint = fit_with_ray(config, data_dir, run_id, Path(tmp) / "checkpoint")
        else:
            epochs = mlflow_tracking.EpochLogger(run_id)
            checkpoint = fit_in_process(config, data, Path(tmp) / "checkpoint", on_epoch=epochs)
            epochs.flush()  # the epochs' metrics buffered while the store was unreachable
        return finish_run(config, data, checkpoint, register=register)
