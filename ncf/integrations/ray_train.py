"""Ray glue for the one training loop: joining a cluster, the Ray Train launcher (TorchTrainer,
Train V2) and the reporters a Ray Train worker or a Ray Tune trial hands the loop."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from ncf.config import Config, config_from_dict
from ncf.data import load_movielens
from ncf.integrations import mlflow_tracking
from ncf.training import format_epoch, train_loop

EpochCallback = Callable[[dict[str, float]], None]


class RayTrainReporter:
    """Reporter for a Ray Train worker: DDP, Ray checkpoints, progress and MLflow from rank 0."""

    def __init__(self, on_epoch: EpochCallback | None = None):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.on_epoch = on_epoch

    def prepare(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def restore(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint else None

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        import ray.train

        if self.rank == 0:
            print(format_epoch(metrics), flush=True)
            if self.on_epoch:
                self.on_epoch(metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None)


class TuneReporter:
    """Reporter of a one-worker Ray Tune trial: every epoch (and its checkpoint) goes to Tune."""

    rank, world_size = 0, 1

    def __init__(self, device: str):
        self.device = torch.device(device)

    def prepare(self, model):
        return model

    def restore(self) -> Path | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint else None

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)


def train_worker(params: dict) -> None:
    """The function every Ray Train worker runs."""
    config = config_from_dict(params["config"])
    data = load_movielens(config.data)
    on_epoch = mlflow_tracking.EpochLogger(params["run_id"], params["tracking_uri"]) if params.get("run_id") else None
    train_loop(config, data, RayTrainReporter(on_epoch))


def free_port() -> int:
    """A loopback port nobody listens on now (others share this machine: never assume a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray() -> None:
    """Join the cluster at RAY_ADDRESS (`auto`: the one `ray start` started here), else start a private one.

    A private cluster gets RAY_ADDRESS pinned for its own processes: Ray Train's placement-group
    cleaner finds "its" cluster through that variable, and on a machine running other Ray clusters it
    would otherwise ask the wrong one and never free a stopped multi-worker trial's CPUs (the next
    trial then waits forever).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    dashboard_port = free_port()
    ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             runtime_env={"env_vars": {"RAY_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}})


def make_trainer(config: Config, run_id: str | None, name: str, callbacks: list | None = None):
    """A TorchTrainer over `train_worker`: workers, GPUs, checkpoints and restarts from config.

    `callbacks` are Ray Train callbacks (a Tune trial passes `TuneReportCallback`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = config.train
    # Rank 0 prints each epoch once; Ray Train's print patch would echo every line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(), "run_id": run_id,
                           "tracking_uri": mlflow_tracking.tracking_uri()},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(cfg.checkpoint_dir).expanduser().resolve()),
            # The latest checkpoint is always kept too (restarts resume from it).
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="best_val_rmse",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
    )


def fit_with_ray(config: Config, run_id: str | None) -> Path:
    """Train under Ray Train; returns a local copy of the final checkpoint."""
    init_ray()
    # A run name Ray Train has seen under the same storage path would be resumed: keep names unique.
    result = make_trainer(config, run_id, name=f"ncf-train-{run_id or uuid.uuid4().hex[:12]}").fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    return Path(result.checkpoint.to_directory())
