"""The served app for tests: a tiny model trained on the real data, registered in a temporary
MLflow store, served by a real local Ray Serve on a free loopback port.

tests/e2e/conftest.py loads these fixtures too, so the browser drives the same kind of app.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from ncf import tracking
from ncf.config import load_config
from ncf.data import MovieLens
from ncf.recommender import Recommender
from ncf.train import LocalReporter, train_loop
from serving.app import free_port, running

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TINY_MODEL = ["model.embedding_dim=16", "model.hidden_dims=[32, 16]", "model.dropouts=[0.1, 0.0]",
              "train.max_epochs=1", "train.refit=false"]


@dataclass
class Store:
    uri: str
    data: MovieLens
    champion: str  # the version promoted when the store was made

    def register_tiny_model(self, seed: int) -> str:
        """Train a tiny model with this seed, log and register it (not promoted); returns its version."""
        config = load_config([*TINY_MODEL, f"train.seed={seed}"])
        result = train_loop(config, self.data, LocalReporter(verbose=False))
        with tempfile.TemporaryDirectory(prefix="ncf-recommender-") as tmp:
            folder = Recommender.from_training(result.model, config, self.data).save(Path(tmp))
            tracking.setup()
            with mlflow.start_run(run_name=f"tiny-seed-{seed}"):
                return str(tracking.log_recommender(folder).registered_model_version)

    def recommender(self, version: str) -> Recommender:
        """The registered version as the app loads it, for comparing answers."""
        model = mlflow.pyfunc.load_model(f"models:/{tracking.MODEL_NAME}/{version}")
        return model.unwrap_python_model().recommender


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory, movielens: MovieLens) -> Iterator[Store]:
    """A temporary MLflow store (MLFLOW_TRACKING_URI points at it) whose champion is a tiny model."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        store = Store(uri, movielens, champion="")
        store.champion = store.register_tiny_model(seed=1)
        tracking.promote(store.champion)
        yield store
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="module")
def served_url(model_store: Store) -> Iterator[str]:
    """The app on 127.0.0.1:<free port> following the store's champion (polled every 0.5 s)."""
    config = load_config([f"serve.port={free_port()}", "serve.poll_interval_s=0.5", "serve.warm_users=100",
                          "serve.min_replicas=1", "serve.max_replicas=1"]).serve
    with running(config, model_store.uri) as url:
        yield url
