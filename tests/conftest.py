"""Shared fixtures: the real MovieLens folder (from NCF_DATA_DIR), the data built from it, and the
served app (a tiny model trained on the real data, registered in a temporary MLflow store, served by
a real local Ray Serve on a free loopback port) that the integration and browser tests both use."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from ncf import tracking
from ncf.config import REPO_ROOT, Config, load_config
from ncf.data import (
    DataError,
    MovieLens,
    encode_movielens,
    load_movielens,
    resolve_data_dir,
    validate_movies,
    validate_ratings,
)
from ncf.distributed import free_port
from ncf.recommender import Recommender
from ncf.train import LocalReporter, train_loop

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DATA_FILES = ("links.csv", "movies.csv", "ratings.csv", "tags.csv")


def _resolve_data_dir(value: str) -> Path:
    """NCF_DATA_DIR as given; a relative path is taken from the working directory, else the repo root."""
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    return path.resolve()


@pytest.fixture(scope="session")
def data_dir(config: Config) -> Path:
    """The real ml-latest-small folder, found as `make train` finds it: NCF_DATA_DIR, else `data.dir`,
    else a verified download into the cache; tests that need it are skipped when none can be had."""
    value = os.environ.get("NCF_DATA_DIR")
    if not value:
        try:
            return resolve_data_dir(config.data)
        except DataError as err:
            pytest.skip(f"no MovieLens data for the real-data tests: {err}")
    folder = _resolve_data_dir(value)
    missing = [name for name in DATA_FILES if not (folder / name).is_file()]
    if missing:
        pytest.fail(f"NCF_DATA_DIR={value!r} resolves to {folder}, which lacks {missing}")
    return folder


@pytest.fixture(scope="session")
def config() -> Config:
    """The default configuration from conf/."""
    return load_config()


@pytest.fixture(scope="session")
def movielens(data_dir: Path, config: Config) -> MovieLens:
    """The real data, verified, encoded and split with the default (seed) protocol."""
    return load_movielens(config.data, data_dir)


@pytest.fixture(scope="session")
def raw_frames(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The validated (ratings, movies) frames of the real data, before encoding."""
    read = {"dtype": str, "keep_default_na": False}
    ratings = validate_ratings(pd.read_csv(data_dir / "ratings.csv", **read))
    movies = validate_movies(pd.read_csv(data_dir / "movies.csv", **read))
    return ratings, movies


@pytest.fixture(scope="session")
def small_movielens(raw_frames: tuple[pd.DataFrame, pd.DataFrame], config: Config) -> MovieLens:
    """The ratings of the first 60 users (about 8,750), over the whole movie catalogue: fast to train on."""
    ratings, movies = raw_frames
    first_users = ratings["userId"].drop_duplicates().sort_values().iloc[:60]
    subset = ratings[ratings["userId"].isin(first_users)].reset_index(drop=True)
    return encode_movielens(subset, movies, config.data.split)


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
    from serving.app import running  # Ray Serve: imported only by the tests that serve

    with running(config, model_store.uri) as url:
        yield url
