"""MLflow glue: where runs go, what each run records, and the registered recommender model.

`MLFLOW_TRACKING_URI` selects the store; without it, SQLite at `./mlruns/mlflow.db`
in the working directory with artifacts under `./mlruns/artifacts` (made absolute,
so Ray workers and `make ui` agree). The driver creates the experiment once before
any worker logs (concurrent creation of a fresh SQLite store crashes).
"""

from __future__ import annotations

import os
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from ncf.config import PACKAGE_DIR, Config, flatten, save_config

EXPERIMENT = "ncf-movielens"
MODEL_NAME = "ncf-movielens"
CHAMPION = "champion"
VALIDATION_METRIC = "best_val_rmse"  # what decides the champion (logged by every finished run)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the SQLite store under the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI; None for servers and other stores."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def setup(experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the store and create the experiment once; returns its id.

    With SQLite, artifacts live in `artifacts/` beside the database file.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is not None:
        experiment_id = existing.experiment_id
    else:
        location = (db.parent / "artifacts").resolve().as_uri() if db is not None else None
        experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


class EpochLogger:
    """Logs one epoch's metrics to a run by id: usable from any process (rank 0, a trial)."""

    def __init__(self, run_id: str, uri: str | None = None):
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri or tracking_uri())

    def __call__(self, metrics: dict[str, float]) -> None:
        step = int(metrics["epoch"])
        stamp = int(pd.Timestamp.now().timestamp() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(key, float(value), stamp, step) for key, value in metrics.items() if key != "epoch"])


def log_config(config: Config) -> None:
    """The resolved config: every value as a param, the file as an artifact."""
    mlflow.log_params(flatten(config))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        save_config(config, path)
        mlflow.log_artifact(str(path))


def log_test_metrics(models: dict[str, dict[str, float]], primary: str = "ncf") -> None:
    """`test_<metric>` for the model; `baselines/<name>/test_<metric>` for the others."""
    for name, metrics in models.items():
        prefix = "test_" if name == primary else f"baselines/{name}/test_"
        mlflow.log_metrics({prefix + key: value for key, value in metrics.items()})


# ----------------------------------------------------------------------------- model


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of `ncf.recommender.Recommender` (the registered model).

    Input with `user_id` and `movie_id`: one row per pair. Input with `user_id`
    only: the top-k (param `k`, default 10) unseen movies of each user. Unknown
    ids raise an error that lists them; there is no silent fallback (the HTTP
    service answers unknown users with popular movies, flagged as cold start).
    """

    def load_context(self, context) -> None:
        from ncf.recommender import Recommender

        self.recommender = Recommender.load(Path(context.artifacts["recommender"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if "user_id" not in model_input.columns:
            raise ValueError("input needs a user_id column (and movie_id for pair predictions)")
        if "movie_id" in model_input.columns and model_input["movie_id"].notna().all():
            return self.recommender.predict_pairs(model_input["user_id"].to_numpy(),
                                                  model_input["movie_id"].to_numpy())
        k = int((params or {}).get("k", 10))
        return self.recommender.recommend(model_input["user_id"].drop_duplicates().to_numpy(), k)


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("long", "user_id"), ColSpec("long", "movie_id", required=False)]),
    params=ParamSchema([ParamSpec("k", "long", 10)]),
)


def pip_requirements() -> list[str]:
    return [f"{name}=={version(name).split('+')[0]}"
            for name in ("mlflow", "torch", "numpy", "pandas", "pyyaml", "pydantic")]


def log_recommender(recommender_dir: Path, register: bool = True) -> mlflow.models.model.ModelInfo:
    """Log the pyfunc with its artifacts and the `ncf` code, and register it."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=RecommenderModel(),
        artifacts={"recommender": str(recommender_dir)},
        code_paths=[str(PACKAGE_DIR)],  # the whole `ncf` package: the model loads without this repo
        pip_requirements=pip_requirements(),
        signature=SIGNATURE,
        registered_model_name=MODEL_NAME if register else None,
    )


def champion_version(client: MlflowClient | None = None) -> mlflow.entities.model_registry.ModelVersion | None:
    client = client or MlflowClient()
    try:
        return client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    except MlflowException:
        return None


def promote(version: str, client: MlflowClient | None = None) -> None:
    (client or MlflowClient()).set_registered_model_alias(MODEL_NAME, CHAMPION, version)


def promote_if_better(version: str, val_rmse: float, client: MlflowClient | None = None) -> dict[str, str]:
    """Move the champion alias to `version` only if its validation RMSE beats the champion's.

    The incumbent's figure is the `best_val_rmse` its run logged (a run without one counts
    as beaten). Returns the decision and both figures, as tags for the runs to record.
    """
    client = client or MlflowClient()
    incumbent = champion_version(client)
    incumbent_val = None
    if incumbent is not None and incumbent.run_id:
        incumbent_val = client.get_run(incumbent.run_id).data.metrics.get(VALIDATION_METRIC)
    promoted = incumbent is None or incumbent_val is None or val_rmse < incumbent_val
    if promoted:
        promote(version, client)
    return {
        "champion.decision": "promoted" if promoted else "kept",
        "champion.candidate_version": version,
        "champion.candidate_val_rmse": f"{val_rmse:.6f}",
        "champion.incumbent_version": str(incumbent.version) if incumbent else "none",
        "champion.incumbent_val_rmse": f"{incumbent_val:.6f}" if incumbent_val is not None else "none",
    }
