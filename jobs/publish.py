"""Publishing a finished training, whoever launched it (train job, Tune sweep): evaluate on
the test split next to the baselines, log metrics, plots and the recommender model to the
active MLflow run, register a model version, and write the metric report."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow

from ncf import plots
from ncf.config import Config
from ncf.data import MovieLens
from ncf.evaluation import DECK_REPORTED, evaluate, evaluate_baselines, format_table
from ncf.integrations import mlflow_tracking
from ncf.model import NCF
from ncf.recommender import NCFScorer, Recommender
from ncf.training import load_checkpoint, model_from_checkpoint


@dataclass
class RunSummary:
    run_id: str
    metrics: dict[str, dict[str, float]]  # "ncf" and each baseline -> metric -> value
    best_val_rmse: float
    model_version: str  # "" when not registered


def log_data_tags(data: MovieLens) -> None:
    mlflow.set_tags({f"data.sha256.{name}": digest for name, digest in data.checksums.items()})
    mlflow.set_tags({f"data.split.{k}": v for k, v in data.splits.sizes().items()})


def log_plots(model: NCF, history: list[dict], data: MovieLens) -> None:
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


def finish_run(config: Config, data: MovieLens, checkpoint: Path, register: bool = True) -> RunSummary:
    """Evaluate the checkpoint's final model and record everything in the active run."""
    model = model_from_checkpoint(checkpoint, config, data)
    state = load_checkpoint(checkpoint)["state"]
    mlflow.log_metrics({"best_epoch": state["best_epoch"], "best_val_rmse": state["best_val_rmse"]})
    print("evaluating on the test split ...", flush=True)
    results = {"ncf": evaluate(NCFScorer(model), data)} | evaluate_baselines(data)
    mlflow_tracking.log_test_metrics(results)
    log_plots(model, state["history"], data)
    with tempfile.TemporaryDirectory(prefix="ncf-recommender-") as tmp:
        folder = Recommender.from_training(model, config, data).save(Path(tmp))
        info = mlflow_tracking.log_recommender(folder, register=register)
    version = str(info.registered_model_version) if register else ""
    return RunSummary(mlflow.active_run().info.run_id, results, float(state["best_val_rmse"]), version)


def write_report(summary: RunSummary, data: MovieLens, path: Path) -> None:
    """Print the metric table (with the deck's reported figures) and write it as JSON."""
    print(format_table(summary.metrics | {"deck (reported)": DECK_REPORTED}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "split": data.splits.sizes(), "models": summary.metrics, "reference": {"deck_reported": DECK_REPORTED},
        "mlflow": {"run_id": summary.run_id, "model": mlflow_tracking.MODEL_NAME, "version": summary.model_version},
    }, indent=2, default=float))
    print(f"wrote {path}")


