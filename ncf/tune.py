"""Hyperparameter search over the one training loop, tracked in MLflow, ending in a champion decision.

Optuna's TPE proposes configs from `conf/tune.yaml`'s space and ASHA stops weak trials
early, both on the validation metric `best_val_rmse`. A trial that fits one worker runs
`train_loop` as a plain function trial (`TuneReporter`); a bigger one launches the
TorchTrainer of `ncf.distributed.make_trainer` and streams its epochs to Tune, its own
driver holding no CPU (a trial holding CPUs starves its Train workers, DESIGN.md §5).

Trials never talk to MLflow: the driver's `TrialRuns` callback records each as a child
run of the sweep's run. When the sweep ends, the best trial continues from its last
checkpoint into the refit phase, then `finish_run` evaluates, logs and registers it, and
`tracking.promote_if_better` decides the champion alias.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from matplotlib.ticker import NullFormatter
from mlflow import MlflowClient
from mlflow.entities import Param
from ray import tune

from ncf import tracking
from ncf.config import Config, Distribution, config_from_dict, flatten, save_config, with_values
from ncf.data import MovieLens, load_movielens, resolve_data_dir
from ncf.distributed import fit_in_process, init_ray, make_trainer
from ncf.evaluate import format_table
from ncf.pipeline import RunSummary, finish_run, log_data_tags
from ncf.plots import plt
from ncf.train import CHECKPOINT_FILE, format_epoch, train_loop

METRIC, MODE = tracking.VALIDATION_METRIC, "min"
SWEEP_CONFIG = "ncf_config.yaml"  # the sweep's base config, kept in its Tune folder for --resume
TRIAL_TAG, SWEEP_TAG = "ncf.trial_id", "ncf.sweep_path"
DRIVER_MEMORY = 256 * 2**20  # bytes a multi-worker trial's driver asks for


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished; its message says how to resume."""


class SweepError(RuntimeError):
    """Nothing to resume, or the sweep already finished; the message says which."""


# ----------------------------------------------------------------------------- space and trials


def search_space(config: Config) -> dict[str, object]:
    """`tune.space` as Tune domains keyed `section.key`, the names trials, Optuna and MLflow share."""
    def domain(spec: Distribution):
        if spec.choice is not None:
            return tune.choice(spec.choice)
        if spec.uniform is not None:
            return tune.uniform(*spec.uniform)
        if spec.loguniform is not None:
            return tune.loguniform(*spec.loguniform)
        return tune.randint(spec.randint[0], spec.randint[1] + 1)

    return {f"{section}.{key}": domain(spec)
            for section, keys in config.tune.space.items() for key, spec in keys.items()}


def dropout_schedule(top: float, layers: int) -> list[float]:
    """The deck's shape: `top` on the first hidden layer, falling linearly to 0 on the last."""
    if layers == 1:
        return [round(top, 4)]
    return [round(top * (1 - i / (layers - 1)), 4) for i in range(layers)]


def trial_config(base: Config, params: dict[str, object], refit: bool = False) -> Config:
    """The base config with a trial's sampled values and the sweep's epoch budget and resources.

    Trials skip the refit phase (only the winner is refit); `refit=True` restores `train.refit`.
    """
    t = base.tune
    values: dict[str, object] = {
        "train.max_epochs": t.max_epochs, "train.refit": base.train.refit and refit,
        "train.num_workers": t.workers_per_trial, "train.cpus_per_worker": t.cpus_per_worker,
        "train.use_gpu": t.gpus_per_worker > 0,
    }
    for key, value in params.items():
        if key == "model.dropouts" and isinstance(value, (int, float)):
            value = dropout_schedule(float(value), len(base.model.hidden_dims))
        values[key] = value
    return with_values(base, values)


class TuneReporter:
    """Reporter of a one-worker trial: every epoch (and its checkpoint) goes to Tune."""

    rank, world_size = 0, 1

    def __init__(self, device: str):
        self.device = torch.device(device)

    def prepare(self, model):
        return model

    def restore(self) -> Path | None:
        checkpoint = tune.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint else None

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)


def run_trial(params: dict, base: dict, data: MovieLens) -> None:
    """The Tune trainable: the training loop here, or under a TorchTrainer for several workers."""
    config = trial_config(config_from_dict(base), params)
    if config.train.num_workers == 1:
        # A line per saved checkpoint would drown the progress lines the driver prints.
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
        torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
        device = "cuda" if config.train.use_gpu and torch.cuda.is_available() else "cpu"
        # Arrays from the object store are read-only; a model buffer made from them could not load a checkpoint.
        train_loop(config, copy.deepcopy(data), TuneReporter(device))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    context = tune.get_context()
    # A stable name per trial: a resumed sweep restarts the trainer from its own checkpoints.
    name = f"{context.get_experiment_name()}-{context.get_trial_id()}"
    result = make_trainer(config, run_id=None, name=name, callbacks=[TuneReportCallback()]).fit()
    if result.error:
        raise result.error


def trial_resources(config: Config) -> dict[str, float]:
    t = config.tune
    if t.workers_per_trial == 1:
        return {"CPU": t.cpus_per_worker, "GPU": t.gpus_per_worker}
    # The TorchTrainer's workers hold the CPUs and GPUs; a driver holding a CPU would starve them.
    # Tune needs a non-empty request: some memory, a resource every Ray node has.
    return {"CPU": 0, "memory": DRIVER_MEMORY}


def concurrent_trials(config: Config) -> int:
    """`tune.max_concurrent_trials`, else as many trials as the cluster's CPUs and GPUs hold."""
    t = config.tune
    if t.max_concurrent_trials:
        return t.max_concurrent_trials
    import ray

    available = ray.cluster_resources()
    limits = [available.get("CPU", 1) // (t.workers_per_trial * t.cpus_per_worker)]
    if t.gpus_per_worker > 0:
        limits.append(available.get("GPU", 0) // (t.workers_per_trial * t.gpus_per_worker))
    return max(1, int(min(limits)))


# ----------------------------------------------------------------------------- MLflow


def epoch_metrics(result: dict) -> dict[str, float]:
    """What the training loop reported, without the fields Tune adds."""
    from ray.tune.result import AUTO_RESULT_KEYS

    return {key: float(value) for key, value in result.items()
            if key not in AUTO_RESULT_KEYS and key != "done"
            and isinstance(value, (int, float, np.number)) and not isinstance(value, bool)}


class TrialRuns(tune.Callback):
    """Each trial as a child MLflow run of the sweep's run, written from the driver: its
    params when it starts, every epoch's metrics, its end state. A resumed sweep finds each
    trial's run again by trial id, so a trial keeps one run across interruptions.
    """

    def __init__(self, parent_run_id: str, experiment_id: str, base: Config, uri: str):
        self.parent_run_id, self.experiment_id, self.uri = parent_run_id, experiment_id, uri
        self.base = base.model_dump()
        self._runs: dict[str, tracking.EpochLogger] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_runs": {}}  # clients stay out of Tune's saved experiment state

    def _logger(self, trial_id: str, name: str | None = None) -> tracking.EpochLogger:
        if trial_id not in self._runs:
            client = MlflowClient(self.uri)
            run_id = find_child_run(client, self.experiment_id, self.parent_run_id, trial_id)
            if run_id is None:
                run_id = client.create_run(self.experiment_id, run_name=name or trial_id, tags={
                    "mlflow.parentRunId": self.parent_run_id, TRIAL_TAG: trial_id}).info.run_id
            self._runs[trial_id] = tracking.EpochLogger(run_id, self.uri)
        return self._runs[trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        logger = self._logger(trial.trial_id, str(trial))
        config = trial_config(config_from_dict(self.base), trial.config)
        params = {k: v for k, v in flatten(config).items() if not k.startswith("tune.")}
        logger.client.log_batch(logger.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        logger.client.update_run(logger.run_id, status="RUNNING")
        print(f"[{trial}] start  " + "  ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in trial.config.items()),
              flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        metrics = epoch_metrics(result)
        if "epoch" in metrics:
            self._logger(trial.trial_id)(metrics)
            print(f"[{trial}] {format_epoch(metrics)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trials, trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trials, trial, "FAILED")

    def _end(self, trials, trial, status: str) -> None:
        logger = self._logger(trial.trial_id)
        logger.client.set_terminated(logger.run_id, status)
        result = trial.last_result or {}
        ended = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        best = min((t.last_result.get(METRIC, math.inf) for t in trials if t.last_result), default=math.nan)
        total = self.base["tune"]["num_samples"]
        print(f"[{trial}] {status.lower()} after {result.get('epoch', 0)} epoch(s), {METRIC} "
              f"{result.get(METRIC, math.nan):.4f}; {ended}/{total} trials ended, best so far {best:.4f}", flush=True)


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def find_child_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"), max_results=1)
    return runs[0].info.run_id if runs else None


# ----------------------------------------------------------------------------- leaderboard


def leaderboard(results, config: Config) -> pd.DataFrame:
    """One row per trial, best first: validation figures, epochs run, why it stopped, its values."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        row: dict[str, object] = {"trial": result.metrics.get("trial_id", Path(result.path).name)}
        if history is None or history.empty or "epoch" not in history:
            rows.append(row | {METRIC: math.nan, "epochs": 0, "stopped_by": "error"} | result.config)
            continue
        history = history.drop_duplicates("epoch", keep="last").sort_values("epoch")
        epochs = int(history["epoch"].max())
        improved = history["improved"].to_numpy() > 0
        stale = len(improved) - 1 - int(np.flatnonzero(improved)[-1]) if improved.any() else len(improved)
        if result.error:
            stopped_by = "error"
        elif epochs >= config.tune.max_epochs:
            stopped_by = "budget"
        elif stale >= config.train.patience:
            stopped_by = "patience"
        else:
            stopped_by = "asha"
        best = history.loc[history["val_rmse"].idxmin()]
        row |= {METRIC: float(history[METRIC].iloc[-1]), "best_epoch": int(best["epoch"]), "epochs": epochs,
                "stopped_by": stopped_by, "stale_epochs": stale}
        rows.append(row | result.config)
    board = pd.DataFrame(rows).sort_values(METRIC, na_position="last").reset_index(drop=True)
    board.index += 1
    return board


@dataclass
class EpochSavings:
    """Trial-epochs the sweep ran against what running every trial to completion would cost."""

    ran: int
    without_asha_max: int  # every trial to its epoch budget
    without_asha_min: int  # each trial ASHA stopped run on only until early stopping could end it

    def describe(self) -> str:
        ran = max(self.ran, 1)
        return (f"trial-epochs run: {self.ran}; every trial run to its epoch budget: {self.without_asha_max} "
                f"({self.without_asha_max / ran:.1f}x); at least {self.without_asha_min} "
                f"({self.without_asha_min / ran:.1f}x) if each trial ASHA stopped had then early-stopped "
                "as soon as train.patience allows")


def epoch_savings(board: pd.DataFrame, config: Config) -> EpochSavings:
    budget, patience = config.tune.max_epochs, config.train.patience
    ran = int(board["epochs"].sum())
    stopped = board["stopped_by"] == "asha"
    extra = np.minimum(budget - board["epochs"], patience - board["stale_epochs"].fillna(0))
    return EpochSavings(ran, len(board) * budget, ran + int(extra[stopped].sum()))


def trials_plot(board: pd.DataFrame, config: Config) -> plt.Figure:
    """Validation RMSE of every trial against each searched value; colour: epochs it ran."""
    keys = list(search_space(config))
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    done = board.dropna(subset=[METRIC])
    for ax, key in zip(axes.flat, keys, strict=False):
        section, name = key.split(".")
        spec = config.tune.space[section][name]
        values = done[key]
        if spec.choice is not None:
            labels = [str(c) for c in spec.choice]
            x = values.map(lambda v, labels=labels: labels.index(str(v)))
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            x = values.astype(float)
            if spec.loguniform is not None:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        points = ax.scatter(x, done[METRIC], c=done["epochs"], cmap="viridis", vmin=1,
                            vmax=config.tune.max_epochs, s=28, edgecolors="k", linewidths=0.3)
        ax.scatter(x.iloc[:1], done[METRIC].iloc[:1], marker="*", s=220, c="crimson", label="best")
        ax.set(xlabel=key, ylabel=METRIC if ax in axes[:, 0] else None)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(done):
        fig.colorbar(points, ax=axes, label="epochs run (ASHA / early stopping)", shrink=0.8)
        axes.flat[0].legend(loc="upper right")
    fig.suptitle("Trials against their hyperparameters")
    return fig


def format_board(board: pd.DataFrame, config: Config) -> str:
    """The leaderboard as a Markdown table (also what the terminal shows)."""
    keys = list(search_space(config))
    columns = ["trial", METRIC, "best_epoch", "epochs", "stopped_by", *keys]
    head = ["#", *[c.split(".")[-1] for c in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, row in board.iterrows():
        cells = [str(rank)] + [_cell(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else (f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.2e}")
    return str(value)


# ----------------------------------------------------------------------------- the sweep


@dataclass
class SweepOutcome:
    name: str
    path: Path
    parent_run_id: str
    board: pd.DataFrame
    savings: EpochSavings
    best_config: Config
    champion: RunSummary  # the best trial, refit, evaluated and registered
    decision: dict[str, str]
    seconds: float

    def report(self) -> str:
        """Leaderboard, ASHA savings, the best config's values and the metric table, as Markdown."""
        values = flatten(self.best_config)
        chosen = "\n".join(f"- `{key}`: {values[key]}" for key in search_space(self.best_config))
        return "\n".join([
            f"# Sweep {self.name}", "",
            f"MLflow parent run `{self.parent_run_id}`; {len(self.board)} trials in {self.seconds / 60:.1f} min.",
            "", "## Leaderboard (validation RMSE)", "", format_board(self.board, self.best_config),
            "", "## ASHA", "", self.savings.describe() + ".", "",
            "## Best trial", "", chosen, "",
            f"Refit on train + validation: {self.best_config.train.refit}. Registered as "
            f"`{tracking.MODEL_NAME}` version {self.champion.model_version}; champion decision: "
            f"**{self.decision['champion.decision']}** (validation RMSE {self.decision['champion.candidate_val_rmse']}"
            f" vs champion {self.decision['champion.incumbent_val_rmse']}, version "
            f"{self.decision['champion.incumbent_version']}).", "",
            "## Test metrics (seed protocol)", "", "```", format_table(self.champion.metrics), "```", "",
        ])


def latest_sweep(storage: Path, name: str | None = None) -> Path:
    """The sweep folder to resume: `name`, or the newest one under `storage`."""
    if name:
        path = Path(name) if Path(name).is_absolute() else storage / name
        candidates = [path]
    else:
        candidates = sorted((p for p in storage.glob("sweep-*") if (p / SWEEP_CONFIG).exists()),
                            key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        if tune.Tuner.can_restore(str(path)):
            return path
    raise SweepError(f"no sweep to resume {'at ' + str(candidates[0]) if name else 'under ' + str(storage)}")


def _parent_run(path: Path) -> str | None:
    runs = mlflow.search_runs(filter_string=f"tags.`{SWEEP_TAG}` = '{path}'", max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


def sweep(config: Config, resume: str | None = None) -> SweepOutcome:
    """Run (or with `resume` = a sweep name or "latest", continue) a sweep; see the module doc."""
    started = time.perf_counter()
    storage = Path(config.train.checkpoint_dir).expanduser().resolve()
    if resume:
        path = latest_sweep(storage, None if resume == "latest" else resume)
        config = _saved_config(path)
        print(f"resuming sweep {path}", flush=True)
    else:
        config = config.model_copy(deep=True)
        config.data.dir = str(resolve_data_dir(config.data))  # trials and the refit load the same files
        config.train.checkpoint_dir = str(storage)
        path = storage / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        path.mkdir(parents=True)
        save_config(config, path / SWEEP_CONFIG)
    data = load_movielens(config.data)
    experiment_id = tracking.setup()
    parent_id = _parent_run(path) if resume else None
    if resume and parent_id is None:
        raise SweepError(f"sweep {path} has no MLflow run in {tracking.tracking_uri()}")
    init_ray()
    # Keeping one checkpoint per trial makes Tune save its state often (cheap here); no warning about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if parent_id and "champion.decision" in MlflowClient().get_run(parent_id).data.tags:
        raise SweepError(f"sweep {path} already finished (MLflow run {parent_id})")
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else path.name,
                          tags=None if parent_id else {SWEEP_TAG: str(path), "ncf.kind": "sweep"}) as parent:
        if not parent_id:
            tracking.log_config(config)
            log_data_tags(data)
        trainable = tune.with_resources(tune.with_parameters(run_trial, base=config.model_dump(), data=data),
                                        trial_resources(config))
        if resume:
            tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
        else:
            tuner = make_tuner(config, trainable, path, parent.info.run_id, experiment_id)
        results = tuner.fit()
        finished = results.num_terminated + results.num_errors
        if finished < config.tune.num_samples or len(results) < config.tune.num_samples:
            _end_as_killed(parent.info.run_id, experiment_id)  # until resumed
            raise SweepInterrupted(f"sweep interrupted with {finished} of {config.tune.num_samples} trials "
                                   f"finished; continue it with: python -m jobs.tune --resume {path.name}")
        return _finish(config, data, results, path, parent.info.run_id, experiment_id, started)


def _end_as_killed(parent_run_id: str, experiment_id: str) -> None:
    client = MlflowClient()
    running = client.search_runs([experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"))
    for run in running:
        client.set_terminated(run.info.run_id, "KILLED")
    mlflow.end_run("KILLED")


def _saved_config(path: Path) -> Config:
    import yaml

    return config_from_dict(yaml.safe_load((path / SWEEP_CONFIG).read_text()))


def make_tuner(config: Config, trainable, path: Path, parent_run_id: str, experiment_id: str) -> tune.Tuner:
    from optuna.samplers import TPESampler
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    t = config.tune
    return tune.Tuner(
        trainable,
        param_space=search_space(config),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, num_samples=t.num_samples, max_concurrent_trials=concurrent_trials(config),
            search_alg=OptunaSearch(sampler=TPESampler(seed=t.seed, n_startup_trials=t.startup_trials)),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=t.max_epochs, grace_period=t.grace_period,
                                    reduction_factor=t.reduction_factor),
        ),
        run_config=tune.RunConfig(
            name=path.name, storage_path=str(path.parent), verbose=0,  # TrialRuns prints progress
            callbacks=[TrialRuns(parent_run_id, experiment_id, config, tracking.tracking_uri())],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=config.train.max_failures),
        ),
    )


def trial_checkpoint(result):
    """The trial's last checkpoint: Tune's own, or the TorchTrainer's a multi-worker trial reported."""
    if result.checkpoint is not None:
        return result.checkpoint
    from ray.train import Checkpoint

    return Checkpoint(result.metrics["checkpoint_path"])


def _finish(config: Config, data: MovieLens, results, path: Path, parent_run_id: str, experiment_id: str,
            started: float) -> SweepOutcome:
    board = leaderboard(results, config)
    savings = epoch_savings(board, config)
    print("\n" + format_board(board, config) + "\n\n" + savings.describe(), flush=True)
    best = results.get_best_result(METRIC, MODE, scope="last")
    best_config = trial_config(config, best.config, refit=True)
    if best_config.train.use_gpu and not torch.cuda.is_available():  # the refit runs here, in the driver
        best_config = with_values(best_config, {"train.use_gpu": False})
    mlflow.log_text(format_board(board, config), "sweep/leaderboard.md")
    mlflow.log_text(board.to_csv(index_label="rank"), "sweep/leaderboard.csv")
    figure = trials_plot(board, config)
    mlflow.log_figure(figure, "sweep/trials_vs_hyperparameters.png")
    plt.close(figure)
    with tempfile.TemporaryDirectory(prefix="ncf-sweep-") as tmp:
        save_config(best_config, Path(tmp) / "best_config.yaml")
        mlflow.log_artifact(str(Path(tmp) / "best_config.yaml"), "sweep")
        mlflow.log_metrics({METRIC: float(board[METRIC].iloc[0]), "trials": len(board),
                            "trial_epochs": savings.ran, "trial_epochs_without_asha_min": savings.without_asha_min,
                            "trial_epochs_without_asha_max": savings.without_asha_max})
        trial_id = best.metrics["trial_id"]
        child = find_child_run(MlflowClient(), experiment_id, parent_run_id, trial_id)
        mlflow.set_tags({"sweep.best_trial": trial_id, "sweep.best_run_id": child})
        folder = Path(tmp) / "best"
        folder.mkdir()
        with trial_checkpoint(best).as_directory() as saved:  # the refit continues a copy
            shutil.copy2(Path(saved) / CHECKPOINT_FILE, folder / CHECKPOINT_FILE)
        with mlflow.start_run(run_id=child, nested=True):
            mlflow.set_tag("ncf.refit_after_sweep", str(best_config.train.refit).lower())
            if best_config.train.refit:  # the trial's own loop, continued into its refit phase
                print(f"best trial {trial_id}: refitting on train + validation", flush=True)
                fit_in_process(best_config, data, child, folder, resume=True)
            summary = finish_run(best_config, data, folder)
            decision = tracking.promote_if_better(summary.model_version, summary.best_val_rmse)
            mlflow.set_tags(decision)
        tracking.log_test_metrics({"ncf": summary.metrics["ncf"]})
        mlflow.set_tags(decision)
    outcome = SweepOutcome(path.name, path, parent_run_id, board, savings, best_config, summary, decision,
                           time.perf_counter() - started)
    mlflow.log_text(outcome.report(), "sweep/report.md")
    print(f"\nbest trial {trial_id} -> {tracking.MODEL_NAME} version {summary.model_version}: "
          f"{decision['champion.decision']} (val RMSE {decision['champion.candidate_val_rmse']} vs champion "
          f"{decision['champion.incumbent_val_rmse']}); test RMSE {summary.metrics['ncf']['rmse']:.4f}", flush=True)
    return outcome
