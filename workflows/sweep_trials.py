"""A sweep's trials: the search space, each trial's config and resources, the Tune trainable,
and the driver-side callback that records every trial as a child MLflow run.

A trial that fits one worker runs `train_loop` as a plain function trial (`TuneReporter`);
a bigger one launches the TorchTrainer of `ncf.integrations.ray_train.make_trainer` and
streams its epochs to Tune, its own driver holding no CPU (a trial driver holding CPUs
starves its Train workers). Trials never talk to MLflow themselves.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Param
from ray import tune

from ncf.config import Config, Distribution, config_from_dict, flatten, with_values
from ncf.data import MovieLens
from ncf.integrations import mlflow_tracking
from ncf.integrations.ray_cluster import require
from ncf.integrations.ray_train import Storage, TuneReporter, make_trainer
from ncf.ranking import CandidateRetriever, fit_retriever
from ncf.retrievers import NO_RETRIEVER
from ncf.training.loop import lower_is_better, train_loop
from ncf.training.reporting import format_epoch
from ncf.training.validation import Validation


def sweep_metric(config: Config) -> tuple[str, str]:
    """What trials are compared on (Tune's metric, ASHA's and the leaderboard's): the best value of
    `train.monitor` so far, with its direction."""
    return f"best_{config.train.monitor}", "min" if lower_is_better(config.train.monitor) else "max"

TRIAL_TAG = "ncf.trial_id"
DRIVER_MEMORY = 256 * 2**20  # bytes a multi-worker trial's driver asks for


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


def shared_retriever(config: Config, data: MovieLens) -> CandidateRetriever | None:
    """The retriever every one-worker trial validates with, fitted once for the sweep on the train split, when no
    trial changes its settings (the space has no `retrieval` keys, nor the seed it is fitted with): fitting the
    history model takes longer than a trial's first epoch. None where each trial fits its own, or there is none."""
    space = config.tune.space
    if ("retrieval" in space or "seed" in space.get("train", {}) or config.tune.workers_per_trial > 1
            or config.retrieval.retriever == NO_RETRIEVER):
        return None
    print(f"fitting the {config.retrieval.retriever} retriever on train once, for every trial", flush=True)
    return fit_retriever(config.retrieval, data.splits.train, data.n_users, data.n_movies, config.train.seed)


def run_trial(params: dict, base: dict, data: MovieLens, data_dir: Path, storage: Storage,
              retriever: CandidateRetriever | None = None) -> None:
    """The Tune trainable: the training loop here on `data` (validated with `retriever` when the sweep fitted one),
    or under a TorchTrainer for several workers, whose workers read `data_dir` and keep checkpoints in
    `storage`."""
    config = trial_config(config_from_dict(base), params)
    if config.train.num_workers == 1:
        # A line per saved checkpoint would drown the progress lines the driver prints.
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
        torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
        device = "cuda" if config.train.use_gpu and torch.cuda.is_available() else "cpu"
        # Arrays from the object store are read-only; a model buffer made from them could not load a checkpoint.
        data = copy.deepcopy(data)
        train_loop(config, data, TuneReporter(device), Validation(config, data, rank=0, retriever=retriever))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    context = tune.get_context()
    # A stable name per trial: a resumed sweep restarts the trainer from its own checkpoints.
    name = f"{context.get_experiment_name()}-{context.get_trial_id()}"
    result = make_trainer(config, data_dir, run_id=None, name=name, callbacks=[TuneReportCallback()],
                          storage=storage).fit()
    if result.error:
        raise result.error


def trial_resources(config: Config) -> dict[str, float]:
    t = config.tune
    if t.workers_per_trial == 1:
        return {"CPU": t.cpus_per_worker, "GPU": t.gpus_per_worker}
    # The TorchTrainer's workers hold the CPUs and GPUs; a driver holding a CPU would starve them.
    # Tune needs a non-empty request: some memory, a resource every Ray node has.
    return {"CPU": 0, "memory": DRIVER_MEMORY}


def require_trial_fits(config: Config) -> None:
    """A ConfigError naming the tune.* keys, before the sweep starts, when the cluster cannot hold one trial
    (Tune would leave every trial pending for ever)."""
    t = config.tune
    gpus = t.gpus_per_worker if t.workers_per_trial == 1 else float(t.gpus_per_worker > 0)  # TorchTrainer: whole
    require(t.workers_per_trial, {"CPU": t.cpus_per_worker, "GPU": gpus},
            f"tune.workers_per_trial={t.workers_per_trial} x tune.cpus_per_worker={t.cpus_per_worker:g}"
            + (f" and {gpus:g} GPU (tune.gpus_per_worker)" if gpus else ""))


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
        self._runs: dict[str, mlflow_tracking.EpochLogger] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_runs": {}}  # clients stay out of Tune's saved experiment state

    def _logger(self, trial_id: str, name: str | None = None) -> mlflow_tracking.EpochLogger:
        if trial_id not in self._runs:
            client = MlflowClient(self.uri)
            run_id = find_child_run(client, self.experiment_id, self.parent_run_id, trial_id)
            if run_id is None:
                run_id = client.create_run(self.experiment_id, run_name=name or trial_id, tags={
                    "mlflow.parentRunId": self.parent_run_id, TRIAL_TAG: trial_id}).info.run_id
            self._runs[trial_id] = mlflow_tracking.EpochLogger(run_id, self.uri)
        return self._runs[trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        config = trial_config(config_from_dict(self.base), trial.config)
        logger = self._logger(trial.trial_id, f"{mlflow_tracking.run_name('trial', config)} {trial.trial_id}")
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
        logger.flush()  # every epoch's metrics in the run before it ends
        logger.client.set_terminated(logger.run_id, status)
        result = trial.last_result or {}
        ended = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        metric, mode = sweep_metric(config_from_dict(self.base))
        values = [t.last_result[metric] for t in trials if t.last_result and metric in t.last_result]
        best = (min if mode == "min" else max)(values, default=math.nan)
        total = self.base["tune"]["num_samples"]
        print(f"[{trial}] {status.lower()} after {result.get('epoch', 0)} epoch(s), {metric} "
              f"{result.get(metric, math.nan):.4f}; {ended}/{total} trials ended, best so far {best:.4f}", flush=True)


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def find_child_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"), max_results=1)
    return runs[0].info.run_id if runs else None
