"""Train the NCF model, evaluate it next to the baselines, track and register it.

    python -m jobs.train [--launcher ray|local] [--set section.key=value ...]

`ray` (default) runs the training loop under Ray Train's TorchTrainer with
`train.num_workers` data-parallel workers; `local` runs the same loop in this
process. Either way the run lands in MLflow with its test metrics, plots and a
registered `ncf-movielens` model version, and `reports/metrics.json` is written.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from jobs.cli import config_from, parser
from ncf import plots, tracking
from ncf.config import REPO_ROOT, Config, config_from_dict
from ncf.data import MovieLens, load_movielens, resolve_data_dir
from ncf.evaluate import DECK_REPORTED, evaluate, evaluate_baselines, format_table
from ncf.model import NCF
from ncf.recommender import NCFScorer, Recommender
from ncf.train import LocalReporter, format_epoch, load_checkpoint, model_from_checkpoint, train_loop

REPORT_PATH = REPO_ROOT / "reports" / "metrics.json"


@dataclass
class TrainOutcome:
    run_id: str
    model_version: str
    promoted: bool
    metrics: dict[str, dict[str, float]]


class RayTrainReporter:
    """Reporter for a Ray Train worker: DDP, Ray checkpoints, MLflow from rank 0."""

    def __init__(self, on_epoch=None):
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


def train_worker(params: dict) -> None:
    """Runs on every Ray Train worker."""
    config = config_from_dict(params["config"])
    data = load_movielens(config.data)
    on_epoch = tracking.EpochLogger(params["run_id"], params["tracking_uri"]) if params.get("run_id") else None
    train_loop(config, data, RayTrainReporter(on_epoch))


def fit_with_ray(config: Config, run_id: str | None) -> Path:
    """Run the loop under TorchTrainer; returns a local copy of the final checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    cfg = config.train
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(), "run_id": run_id, "tracking_uri": tracking.tracking_uri()},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(
            name=f"ncf-train-{run_id or 'untracked'}",
            storage_path=str(Path(cfg.checkpoint_dir).expanduser().resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="best_val_rmse",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    return Path(result.checkpoint.to_directory())


def fit_in_process(config: Config, data: MovieLens, run_id: str | None, checkpoint_dir: Path) -> Path:
    on_epoch = tracking.EpochLogger(run_id) if run_id else None
    reporter = LocalReporter(checkpoint_dir, device="cuda" if config.train.use_gpu else "cpu", on_epoch=on_epoch)
    train_loop(config, data, reporter)
    return checkpoint_dir


def log_plots(model: NCF, history: list[dict], data: MovieLens) -> dict[str, np.ndarray]:
    test = data.splits.test
    out = NCFScorer(model).explain(test.user, test.movie)
    for name, figure in {
        "learning_curves": plots.learning_curves(history),
        "ratings_predicted_vs_true": plots.rating_distributions(test.rating, out["rating"]),
        "movie_embeddings": plots.movie_embedding_map(model, data),
        "attention_weights": plots.attention_histogram(out["user_weight"]),
    }.items():
        mlflow.log_figure(figure, f"plots/{name}.png")
        plots.plt.close(figure)
    return out


def run(config: Config, launcher: str = "ray", register: bool = True, report_path: Path | None = REPORT_PATH,
        run_name: str | None = None, tags: dict[str, str] | None = None) -> TrainOutcome:
    """Train, evaluate, log, register: the whole `make train`."""
    config = config.model_copy(deep=True)
    config.data.dir = str(resolve_data_dir(config.data))  # workers load the same verified files
    data = load_movielens(config.data)
    tracking.setup()
    with mlflow.start_run(run_name=run_name, log_system_metrics=True, tags=tags) as active:
        run_id = active.info.run_id
        tracking.log_config(config)
        mlflow.set_tags({f"data.sha256.{name}": digest for name, digest in data.checksums.items()})
        mlflow.set_tags({f"data.split.{k}": v for k, v in data.splits.sizes().items()} | {"launcher": launcher})
        with tempfile.TemporaryDirectory(prefix="ncf-run-") as tmp:
            if launcher == "ray":
                checkpoint = fit_with_ray(config, run_id)
            else:
                checkpoint = fit_in_process(config, data, run_id, Path(tmp) / "checkpoint")
            model = model_from_checkpoint(checkpoint, config, data)
            state = load_checkpoint(checkpoint)["state"]
            mlflow.log_metrics({"best_epoch": state["best_epoch"], "best_val_rmse": state["best_val_rmse"]})

            print("evaluating on the test split ...", flush=True)
            results = {"ncf": evaluate(NCFScorer(model), data)} | evaluate_baselines(data)
            tracking.log_test_metrics(results)
            log_plots(model, state["history"], data)
            recommender_dir = Recommender.from_training(model, config, data).save(Path(tmp) / "recommender")
            info = tracking.log_recommender(recommender_dir, register=register)

    version, promoted = "", False
    if register:
        version = str(info.registered_model_version)
        if tracking.champion_version() is None:
            tracking.promote(version)
            promoted = True
    print(format_table(results | {"deck (reported)": DECK_REPORTED}))
    print(f"MLflow run {run_id}; model {tracking.MODEL_NAME} version {version}"
          + (" (champion)" if promoted else ""))
    if report_path:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps({
            "split": data.splits.sizes(), "models": results, "reference": {"deck_reported": DECK_REPORTED},
            "mlflow": {"run_id": run_id, "model": tracking.MODEL_NAME, "version": version},
        }, indent=2))
        print(f"wrote {report_path}")
    return TrainOutcome(run_id, version, promoted, results)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--launcher", choices=("ray", "local"), default="ray")
    args = p.parse_args(argv)
    run(config_from(args), launcher=args.launcher)
    return 0


if __name__ == "__main__":
    sys.exit(main())
