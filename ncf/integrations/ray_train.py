"""Ray glue for the one training loop: where Ray Train and Tune store checkpoints (`storage_location`), the
Ray Train launcher (TorchTrainer, Train V2; the cluster itself: `ncf.integrations.ray_cluster`) and the
reporters a Ray Train worker or a Ray Tune trial hands the loop."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import pyarrow.fs
import torch
from mlflow.entities import RunTag

from ncf.config import Config, ConfigError, TrainConfig, config_from_dict
from ncf.files import check_writable
from ncf.integrations import mlflow_tracking, ray_data
from ncf.integrations.ray_cluster import cluster_cpus, init_ray, require, shared_out
from ncf.prepared import load_movielens
from ncf.training.checkpoints import CheckpointError, load_checkpoint
from ncf.training.loop import lower_is_better, train_loop
from ncf.training.reporting import format_epoch
from ncf.training.validation import Validation

EpochCallback = Callable[[dict[str, float]], None]
logger = logging.getLogger(__name__)


def load_ray_checkpoint(checkpoint) -> dict | None:
    """The Ray checkpoint to resume from, verified and loaded (CheckpointError naming it if corrupt). Read in
    place when it is on this machine's disk, else from a download Ray deletes afterwards: nothing is left behind.

    Ray hands a restarted run only its latest checkpoint, so a corrupt one stops the run with a clear
    error rather than falling back: the failure, with the path, ends in the trainer's `result.error`."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        try:
            return load_checkpoint(Path(folder))
        except CheckpointError as err:
            raise CheckpointError(f"{err} (Ray checkpoint {checkpoint.path})") from None


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

    def restore(self) -> dict | None:
        import ray.train

        return load_ray_checkpoint(ray.train.get_checkpoint())

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

    def restore(self) -> dict | None:
        from ray import tune

        return load_ray_checkpoint(tune.get_checkpoint())

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)


def worker_placement() -> dict[str, str]:
    """Where this Ray Train worker runs, as run tags: `ray.worker.<rank>.node_id` and `.node_ip`."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    return {f"ray.worker.{rank}.node_id": ray.get_runtime_context().get_node_id(),
            f"ray.worker.{rank}.node_ip": ray.util.get_node_ip_address()}


def _tag_run(client, run_id: str, tags: dict[str, str]) -> None:
    try:
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    except Exception as err:  # the store stayed unreachable: the run misses these tags, training goes on
        logger.warning("could not tag MLflow run %s with %s: %s", run_id, sorted(tags), err)


def train_worker(params: dict) -> None:
    """The function every Ray Train worker runs: its batches from memory (read from the driver's data folder,
    `params["data_dir"]`), or from its Ray Data shard (`data.loader: ray_data`, the driver's prepared folder in
    `params["prepared"]`). With a run id, each
    worker tags the run with the node it runs on (a replacement worker after a failure overwrites its
    rank's tags)."""
    config = config_from_dict(params["config"])
    on_epoch = tagging = None
    if params.get("run_id"):
        on_epoch = mlflow_tracking.EpochLogger(params["run_id"], params["tracking_uri"])
        # Sent beside training, as the epochs' metrics are: an unreachable store never holds training up.
        tagging = threading.Thread(target=_tag_run, args=(on_epoch.client, on_epoch.run_id, worker_placement()),
                                   name="mlflow-placement-tags", daemon=True)
        tagging.start()
    reporter = RayTrainReporter(on_epoch)
    if config.data.loader == "ray_data":
        data, validation = ray_data.worker_data(config, Path(params["prepared"]), reporter.rank)
        batches = ray_data.ShardBatches(config, reporter)
    else:
        data, batches = load_movielens(config.data, Path(params["data_dir"])), None
        validation = Validation(config, data, reporter.rank)
    train_loop(config, data, reporter, validation, batches)
    if on_epoch:
        on_epoch.flush()  # the epochs' metrics buffered while the store was unreachable
        tagging.join()


class Storage(NamedTuple):
    """Where Ray Train and Tune keep checkpoints and experiment state: a filesystem and a path on it
    (RunConfig's `storage_filesystem` and `storage_path`)."""

    filesystem: pyarrow.fs.FileSystem
    path: str  # on `filesystem`: an absolute folder, or `bucket/prefix` on S3

    @property
    def uri(self) -> str:
        """The location as a user writes it: the folder, or `s3://bucket/prefix`."""
        return f"s3://{self.path}" if self.filesystem.type_name == "s3" else self.path

    def join(self, *parts: str) -> str:
        """A path below this location, on its filesystem."""
        return "/".join([self.path.rstrip("/"), *parts])


# Where an S3-compatible store is reached, first set wins (boto3's own variables, then MLflow's).
S3_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def storage_location(train: TrainConfig, environ: Mapping[str, str] | None = None) -> Storage:
    """`train.storage_uri` as the filesystem and path Ray Train and Tune store under.

    None: the local folder `train.checkpoint_dir` (made absolute). `s3://bucket/prefix`: pyarrow's S3
    filesystem at the endpoint of S3_ENDPOINT_VARIABLES (none set: AWS itself) in AWS_REGION or
    AWS_DEFAULT_REGION. Credentials are not read here: each process that opens the filesystem finds its
    own in its environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, a profile, an
    instance role), so none travel inside the filesystem Ray pickles to its workers and actors.
    A local path or `file://` URI is a local folder. Any other scheme is a ConfigError.
    """
    env = os.environ if environ is None else environ
    uri = train.storage_uri
    if not uri:
        return Storage(pyarrow.fs.LocalFileSystem(), str(Path(train.checkpoint_dir).expanduser().resolve()))
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        folder = parsed.path if parsed.scheme else uri
        return Storage(pyarrow.fs.LocalFileSystem(), str(Path(folder).expanduser().resolve()))
    if parsed.scheme != "s3":
        raise ConfigError(f"train.storage_uri {uri!r}: unsupported scheme '{parsed.scheme}://'; use "
                          "s3://bucket/prefix (any S3-compatible store), a local folder, or null for "
                          "train.checkpoint_dir")
    if not parsed.netloc:
        raise ConfigError(f"train.storage_uri {uri!r} names no bucket: use s3://bucket/prefix")
    options: dict[str, str] = {}
    endpoint = next((env[name] for name in S3_ENDPOINT_VARIABLES if env.get(name)), None)
    if endpoint:
        target = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=target.netloc, scheme=target.scheme)
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    return Storage(pyarrow.fs.S3FileSystem(**options), path)


def worker_resources(train: TrainConfig) -> dict[str, float]:
    """The CPUs each Ray Train worker holds: `train.cpus_per_worker`, or (null) the cluster's CPUs shared out
    among the `train.num_workers` workers, at least one each (`shared_out`)."""
    return {"CPU": train.cpus_per_worker or shared_out(cluster_cpus(), train.num_workers)}


def make_trainer(config: Config, data_dir: Path, run_id: str | None, name: str, callbacks: list | None = None,
                 storage: Storage | None = None):
    """A TorchTrainer over `train_worker`: workers, GPUs, checkpoints and restarts from config; every worker
    reads the dataset in `data_dir` (the folder the driver resolved, `ncf.data.resolve_data_dir`).

    Workers that the cluster cannot hold are a ConfigError naming the keys, before anything starts (`require`).
    `callbacks` are Ray Train callbacks (a Tune trial passes `TuneReportCallback`). Checkpoints go to
    `storage` (default `storage_location(config.train)`), where a restarted worker group resumes from the
    latest one. With
    `data.loader: ray_data` the workers' batches are shards of the prepared Parquet (`ncf.integrations.ray_data`).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = config.train
    storage = storage or storage_location(cfg)
    per_worker = worker_resources(cfg)
    cpus = f"{cfg.cpus_per_worker:g}" if cfg.cpus_per_worker else "null (the cluster's CPUs shared out, >= 1 each)"
    require(cfg.num_workers, per_worker | {"GPU": 1.0 if cfg.use_gpu else 0.0},
            f"train.num_workers={cfg.num_workers} x train.cpus_per_worker={cpus}"
            + (" with one GPU each (train.use_gpu)" if cfg.use_gpu else ""))
    streamed = ray_data.training_datasets(config, data_dir) if config.data.loader == "ray_data" else None
    # Rank 0 prints each epoch once; Ray Train's print patch would echo every line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(), "data_dir": str(data_dir), "run_id": run_id,
                           "tracking_uri": mlflow_tracking.tracking_uri(),
                           "prepared": str(streamed.folder) if streamed else None},
        datasets=streamed.datasets if streamed else None,
        dataset_config=DataConfig(datasets_to_split=list(streamed.datasets)) if streamed else None,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            # The latest checkpoint is always kept too (restarts resume from it).
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=f"best_{cfg.monitor}",
                checkpoint_score_order="min" if lower_is_better(cfg.monitor) else "max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
    )


def fit_with_ray(config: Config, data_dir: Path, run_id: str | None, into: Path) -> Path:
    """Train under Ray Train on the dataset in `data_dir`; returns `into`, a copy of the final checkpoint
    (downloaded when in S3) that the caller owns and removes. A local checkpoint folder that cannot be
    written is a WriteError naming it, before Ray starts."""
    storage = storage_location(config.train)
    if storage.filesystem.type_name == "local":
        check_writable(Path(storage.path), "checkpoint")
    init_ray()
    # A run name Ray Train has seen under the same storage path would be resumed: keep names unique.
    result = make_trainer(config, data_dir, run_id, name=f"ncf-train-{run_id or uuid.uuid4().hex[:12]}").fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    return Path(result.checkpoint.to_directory(str(into)))
