"""Search hyperparameters (Ray Tune + Optuna TPE + ASHA), register the best model, promote it if better.

    python -m jobs.tune [--set section.key=value ...]     a new sweep (conf/tune.yaml)
    python -m jobs.tune --resume [NAME]                   continue an interrupted sweep (default: the newest)

Optuna's TPE proposes configs from `conf/tune.yaml`'s space and ASHA stops weak trials
early, both on the best validation value of `train.monitor` (the trials: `workflows.sweep_trials`).
Each trial is a child MLflow run of the sweep's run. When the sweep ends, the best trial
continues from its last checkpoint into the refit phase, is evaluated on the test split,
registered as an `ncf-movielens` version and made `champion` only if its validation RMSE
beats the champion's. The sweep's report (`workflows.sweep_report`: leaderboard, ASHA savings,
test metrics) is printed and written to `reports/tune.md`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pyarrow.fs
import torch
import yaml
from mlflow import MlflowClient
from ray import tune

from ncf import plots
from ncf.config import Config, ConfigError, config_from_dict, load_config, override_parser, save_config, with_values
from ncf.data import MovieLens, resolve_data_dir
from ncf.files import WriteError, check_writable, write_atomically
from ncf.integrations import mlflow_tracking
from ncf.integrations.ray_cluster import init_ray
from ncf.integrations.ray_train import Storage, storage_location
from ncf.prepared import load_movielens
from ncf.training.checkpoints import CheckpointError, copy_checkpoint
from ncf.training.loop import fit_in_process
from workflows.champion import gate
from workflows.publish import finish_run, headline, log_data_tags
from workflows.sweep_report import SweepOutcome, epoch_savings, format_board, leaderboard
from workflows.sweep_trials import (
    TrialRuns,
    concurrent_trials,
    find_child_run,
    require_trial_fits,
    run_trial,
    search_space,
    shared_retriever,
    sweep_metric,
    trial_config,
    trial_resources,
)

SWEEP_CONFIG = "ncf_config.yaml"  # the sweep's base config, kept in its Tune folder for --resume
SWEEP_DATA_DIR = "data_dir.txt"  # the data folder its trials and refit read, kept beside it
SWEEP_TAG = "ncf.sweep_path"
INTERRUPTED = 130  # the shell's code for Ctrl-C: the sweep can be resumed


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished; its message says how to resume."""


class SweepError(RuntimeError):
    """Nothing to resume, or the sweep already finished; the message says which."""


def latest_sweep(storage: Storage, name: str | None = None) -> Storage:
    """The sweep folder to resume: `name`, or the newest one under `storage` (a local folder or S3)."""
    fs = storage.filesystem
    if name:
        local = fs.type_name == "local" and Path(name).is_absolute()
        candidates = [str(Path(name).resolve()) if local else storage.join(name)]
    else:
        found = fs.get_file_info(pyarrow.fs.FileSelector(storage.path, allow_not_found=True))
        folders = [info for info in found
                   if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("sweep-")]
        configs = fs.get_file_info([f"{folder.path}/{SWEEP_CONFIG}" for folder in folders])
        # Newest first: by the folder's time, or its saved config's where folders have none (S3).
        saved = [(folder, config) for folder, config in zip(folders, configs, strict=True)
                 if config.type == pyarrow.fs.FileType.File]
        candidates = [folder.path for folder, config in sorted(
            saved, key=lambda pair: pair[0].mtime or pair[1].mtime, reverse=True)]
    for path in candidates:
        if tune.Tuner.can_restore(path, storage_filesystem=fs):
            return Storage(fs, path)
    where = Storage(fs, candidates[0]).uri if name else storage.uri
    raise SweepError(f"no sweep to resume {'at' if name else 'under'} {where}")


def _parent_run(path: Storage) -> str | None:
    runs = mlflow.search_runs(filter_string=f"tags.`{SWEEP_TAG}` = '{path.uri}'", max_results=1,
                              output_format="list")
    return runs[0].info.run_id if runs else None


def sweep(config: Config, resume: str | None = None) -> SweepOutcome:
    """Run (or with `resume` = a sweep name or "latest", continue) a sweep; see the module doc."""
    started = time.perf_counter()
    storage = storage_location(config.train)  # checkpoint_dir, or train.storage_uri (S3)
    if resume:
        path = latest_sweep(storage, None if resume == "latest" else resume)
        config, data_dir = _saved_config(path)
        print(f"resuming sweep {path.uri}", flush=True)
    else:
        data_dir = resolve_data_dir(config.data)  # trials and the refit load the same files
        path = Storage(storage.filesystem, storage.join(f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"))
        path.filesystem.create_dir(path.path)
        with tempfile.TemporaryDirectory(prefix="ncf-sweep-") as tmp:
            save_config(config, Path(tmp) / SWEEP_CONFIG)
            (Path(tmp) / SWEEP_DATA_DIR).write_text(str(data_dir))
            for name in (SWEEP_CONFIG, SWEEP_DATA_DIR):
                pyarrow.fs.copy_files(str(Path(tmp) / name), path.join(name), destination_filesystem=path.filesystem)
    data = load_movielens(config.data, data_dir)
    # Multi-worker trials' TorchTrainers keep their checkpoints beside the sweep's trials.
    trainers = Storage(path.filesystem, path.path.rstrip("/").rsplit("/", 1)[0])
    experiment_id = mlflow_tracking.setup()
    parent_id = _parent_run(path) if resume else None
    if resume and parent_id is None:
        raise SweepError(f"sweep {path.uri} has no MLflow run in {mlflow_tracking.tracking_uri()}")
    init_ray()
    require_trial_fits(config)
    # Keeping one checkpoint per trial makes Tune save its state often (cheap here); no warning about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if parent_id and "champion.decision" in MlflowClient().get_run(parent_id).data.tags:
        raise SweepError(f"sweep {path.uri} already finished (MLflow run {parent_id})")
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else
                          f"{mlflow_tracking.run_name('tune', config)} ({_name(path)})",
                          tags=None if parent_id else {SWEEP_TAG: path.uri, "ncf.kind": "sweep"}) as parent:
        if not parent_id:
            mlflow_tracking.log_config(config)
            log_data_tags(data)
            mlflow_tracking.log_data_inputs(data, config)
        trainable = tune.with_resources(tune.with_parameters(run_trial, base=config.model_dump(), data=data,
                                                             data_dir=data_dir, storage=trainers,
                                                             retriever=shared_retriever(config, data)),
                                        trial_resources(config))
        if resume:
            tuner = tune.Tuner.restore(path.path, trainable, resume_errored=True,
                                       storage_filesystem=path.filesystem)
        else:
            tuner = make_tuner(config, trainable, path, parent.info.run_id, experiment_id)
        results = tuner.fit()
        finished = results.num_terminated + results.num_errors
        if finished < config.tune.num_samples or len(results) < config.tune.num_samples:
            _end_as_killed(parent.info.run_id, experiment_id)  # until resumed
            raise SweepInterrupted(f"sweep interrupted with {finished} of {config.tune.num_samples} trials "
                                   f"finished; continue it with: python -m jobs.tune --resume {_name(path)}")
        return _finish(config, data, results, path, parent.info.run_id, experiment_id, started)


def _end_as_killed(parent_run_id: str, experiment_id: str) -> None:
    client = MlflowClient()
    running = client.search_runs([experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"))
    for run in running:
        client.set_terminated(run.info.run_id, "KILLED")
    mlflow.end_run("KILLED")


def _name(path: Storage) -> str:
    """The sweep's folder name (Tune's experiment name)."""
    return path.path.rstrip("/").rsplit("/", 1)[-1]


def _saved_config(path: Storage) -> tuple[Config, Path]:
    """The sweep's base config and data folder (sweeps saved before the data folder was kept on its own had it
    in their config's `data.dir`)."""
    with path.filesystem.open_input_stream(path.join(SWEEP_CONFIG)) as saved:
        config = config_from_dict(yaml.safe_load(saved.read().decode()))
    if path.filesystem.get_file_info(path.join(SWEEP_DATA_DIR)).type != pyarrow.fs.FileType.File:
        return config, resolve_data_dir(config.data)
    with path.filesystem.open_input_stream(path.join(SWEEP_DATA_DIR)) as saved:
        return config, Path(saved.read().decode())


def make_tuner(config: Config, trainable, path: Storage, parent_run_id: str, experiment_id: str) -> tune.Tuner:
    from optuna.samplers import TPESampler
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    t = config.tune
    metric, mode = sweep_metric(config)
    return tune.Tuner(
        trainable,
        param_space=search_space(config),
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=t.num_samples, max_concurrent_trials=concurrent_trials(config),
            search_alg=OptunaSearch(sampler=TPESampler(seed=t.seed, n_startup_trials=t.startup_trials)),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=t.max_epochs, grace_period=t.grace_period,
                                    reduction_factor=t.reduction_factor),
        ),
        run_config=tune.RunConfig(
            name=_name(path), storage_path=path.path.rstrip("/").rsplit("/", 1)[0],  # the sweep's folder
            storage_filesystem=path.filesystem, verbose=0,  # TrialRuns prints progress
            callbacks=[TrialRuns(parent_run_id, experiment_id, config, mlflow_tracking.tracking_uri())],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=config.train.max_failures),
        ),
    )


def trial_checkpoint(result, filesystem: pyarrow.fs.FileSystem | None = None):
    """The trial's last checkpoint: Tune's own, or the TorchTrainer's a multi-worker trial reported
    (a path on the sweep's storage `filesystem`)."""
    if result.checkpoint is not None:
        return result.checkpoint
    from ray.train import Checkpoint

    return Checkpoint(result.metrics["checkpoint_path"], filesystem=filesystem)


def _finish(config: Config, data: MovieLens, results, path: Storage, parent_run_id: str, experiment_id: str,
            started: float) -> SweepOutcome:
    board = leaderboard(results, config)
    savings = epoch_savings(board, config)
    print("\n" + format_board(board, config) + "\n\n" + savings.describe(), flush=True)
    metric, mode = sweep_metric(config)
    best = results.get_best_result(metric, mode, scope="last")
    best_config = trial_config(config, best.config, refit=True)
    if best_config.train.use_gpu and not torch.cuda.is_available():  # the refit runs here, in the driver
        best_config = with_values(best_config, {"train.use_gpu": False})
    mlflow.log_text(format_board(board, config), "sweep/leaderboard.md")
    mlflow.log_text(board.to_csv(index_label="rank"), "sweep/leaderboard.csv")
    figure = plots.trials_plot(board, config, metric)
    mlflow.log_figure(figure, "sweep/trials_vs_hyperparameters.png")
    plots.plt.close(figure)
    with tempfile.TemporaryDirectory(prefix="ncf-sweep-") as tmp:
        save_config(best_config, Path(tmp) / "best_config.yaml")
        mlflow.log_artifact(str(Path(tmp) / "best_config.yaml"), "sweep")
        mlflow.log_metrics({metric: float(board[metric].iloc[0]), "trials": len(board),
                            "trial_epochs": savings.ran, "trial_epochs_without_asha_min": savings.without_asha_min,
                            "trial_epochs_without_asha_max": savings.without_asha_max})
        trial_id = best.metrics["trial_id"]
        child = find_child_run(MlflowClient(), experiment_id, parent_run_id, trial_id)
        mlflow.set_tags({"sweep.best_trial": trial_id, "sweep.best_run_id": child})
        folder = Path(tmp) / "best"
        with trial_checkpoint(best, path.filesystem).as_directory() as saved:  # the refit continues a copy
            copy_checkpoint(Path(saved), folder)
        with mlflow.start_run(run_id=child, nested=True):
            mlflow.set_tag("ncf.refit_after_sweep", str(best_config.train.refit).lower())
            if best_config.train.refit:  # the trial's own loop, continued into its refit phase
                print(f"best trial {trial_id}: refitting on train + validation", flush=True)
                epochs = mlflow_tracking.EpochLogger(child) if child else None
                fit_in_process(best_config, data, folder, resume=True, on_epoch=epochs)
                if epochs:
                    epochs.flush()
            summary = finish_run(best_config, data, folder)
            decision = gate(summary, best_config)
        mlflow_tracking.log_test_metrics({"ncf": summary.metrics["ncf"]})
        mlflow.set_tags(decision)
    outcome = SweepOutcome(_name(path), path.uri, parent_run_id, board, savings, best_config, summary, decision,
                           time.perf_counter() - started)
    mlflow.log_text(outcome.report(), "sweep/report.md")
    print(f"\nbest trial {trial_id} -> {summary.model_name} version {summary.model_version}: "
          f"{decision['champion.decision']} ({decision['champion.metric']} {decision['champion.candidate_value']} vs "
          f"champion {decision['champion.incumbent_value']}); test {headline(summary.metrics['ncf'])}", flush=True)
    return outcome


def main(argv: list[str] | None = None) -> int:
    p = override_parser(__doc__.splitlines()[0])
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="NAME",
                   help="continue an interrupted sweep with its own saved config (NAME: its folder under "
                        "train.checkpoint_dir, or train.storage_uri when set; default: the newest there)")
    p.add_argument("--report", type=Path, default=Path("reports") / "tune.md",
                   help="where to write the sweep's Markdown report (relative: to the working directory)")
    args = p.parse_args(argv)
    try:
        check_writable(args.report.parent, "report")  # before the sweep, not after it
        outcome = sweep(load_config(args.overrides, preset=args.preset), resume=args.resume)
        write_atomically(args.report, outcome.report(), "report")
    except SweepInterrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        return INTERRUPTED
    except (SweepError, WriteError, CheckpointError, ConfigError) as problem:
        print(problem, file=sys.stderr, flush=True)
        return 2
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
