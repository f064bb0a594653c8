"""Shared fixtures and the three test layers.

Layers (a marker each, set from the folder a test lives in): `unit` (tests/unit: hermetic,
on the tiny synthetic dataset in tests/fixtures/ml-tiny; no data folder, network, Ray
cluster or browser), `integration` (tests/integration: the real MovieLens data, real Ray,
MLflow and HTTP services), `e2e` (tests/e2e: a real browser). `make test-unit` runs the
first; `make test` all three.

The real data is found as `make train` finds it (NCF_DATA_DIR, else `data.dir`, else a
verified download); the served app (a tiny model trained on the real data, registered in a
temporary MLflow store, served by a real local Ray Serve on a free loopback port) is shared
by the integration and browser tests.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ncf.config import Config, load_config
from ncf.data import DataError, MovieLens, resolve_data_dir
from ncf.ports import free_port
from ncf.prepared import load_movielens
from ncf.ranking import fit_retriever
from ncf.recommender import Recommender
from ncf.training.loop import train_loop
from ncf.training.reporting import LocalReporter
from ncf.training.validation import Validation

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "e2e")

# A synthetic dataset in the ml-latest-small format: 60 users, 405 movies (5 never rated), 3,105 ratings from
# biases and latent factors (something to learn), titles with commas and quotes, movies without genres.
TINY_DIR = TESTS / "fixtures" / "ml-tiny"
TINY_SHA256 = {"movies.csv": "12512e9e06eb42fc6ea67c9c809037014620585f422a503b74209d576592a9f8",
               "ratings.csv": "ef08fc08cc4301d00f18c4860902385a4cc7c7bafa90ac99113307cb98be2b83"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test gets the marker of its layer's folder."""
    for item in items:
        layer = Path(item.fspath).relative_to(TESTS).parts[0]
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture(autouse=True, scope="module")
def _ratings_store_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Served apps, jobs and subprocesses keep posted ratings in a store of the module's own (NCF_FEEDBACK_URI),
    never in the working directory's feedback/ratings.db, and no module sees another's ratings."""
    previous = os.environ.get("NCF_FEEDBACK_URI")
    os.environ["NCF_FEEDBACK_URI"] = f"sqlite:///{tmp_path_factory.mktemp('feedback') / 'ratings.db'}"
    yield
    if previous is None:
        os.environ.pop("NCF_FEEDBACK_URI")
    else:
        os.environ["NCF_FEEDBACK_URI"] = previous


@pytest.fixture(autouse=True, scope="module")
def _mlflow_follows_the_environment() -> Iterator[None]:
    """A job run in-process points MLflow's process-wide URIs at its store (`mlflow_tracking.setup`); after each
    module they follow MLFLOW_TRACKING_URI again (as the module's fixtures left it), so no later module reads
    an earlier module's store."""
    yield
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and "mlflow" in sys.modules:  # imported only by the modules that use it: the unit layer never does
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)


@pytest.fixture(scope="session")
def config() -> Config:
    """The default configuration from conf/."""
    return load_config()


# ----------------------------------------------------------------------------- the tiny synthetic dataset


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The tiny dataset's folder (read-only: copy it before changing anything)."""
    return TINY_DIR


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The defaults, with the data section pointing at the tiny dataset (ml-latest-small's format) and its
    checksums, and its prepared copy in a temporary folder."""
    return load_config([f"data.dir={TINY_DIR}", f"data.datasets.ml-latest-small.sha256={TINY_SHA256}",
                        f"data.prepared_dir={tmp_path_factory.mktemp('prepared')}"])


@pytest.fixture(scope="session")
def tiny_movielens(tiny_config: Config) -> MovieLens:
    """The tiny dataset, verified, encoded and split with the default (seed) protocol."""
    return load_movielens(tiny_config.data, TINY_DIR)


# ----------------------------------------------------------------------------- the real data


@pytest.fixture(scope="session")
def data_dir(config: Config) -> Path:
    """The real ml-latest-small folder, found as `make train` finds it; the tests that need it are
    skipped, saying why, when none can be had (and fail when NCF_DATA_DIR names a wrong folder)."""
    try:
        return resolve_data_dir(config.data)
    except DataError as err:
        if os.environ.get("NCF_DATA_DIR"):
            pytest.fail(f"NCF_DATA_DIR={os.environ['NCF_DATA_DIR']!r}: {err}")
        pytest.skip(f"no MovieLens data for the real-data tests: {err}")


@pytest.fixture(scope="session")
def movielens(data_dir: Path, config: Config) -> MovieLens:
    """The real data, verified, encoded and split with the default (seed) protocol."""
    return load_movielens(config.data, data_dir)


# ----------------------------------------------------------------------------- a store and the served app


# The tiny preset's model (conf/presets/tiny.yaml) for 1 epoch: the train job runs for real (data, training,
# evaluation, MLflow) in seconds.
TINY = "tiny"
TINY_TRAINING = ["train.max_epochs=1", "train.refit=false", "train.batch_size=1024"]


@pytest.fixture(scope="session")
def tiny_training_overrides() -> list[str]:
    """The overrides over the tiny preset (`load_config(..., preset="tiny")`) of a 1-epoch training."""
    return list(TINY_TRAINING)


@pytest.fixture(scope="session")
def tiny_training_args() -> list[str]:
    """`--preset tiny` and the `--set` arguments of `python -m jobs.train` for a 1-epoch tiny model."""
    return ["--preset", TINY, *(arg for key in TINY_TRAINING for arg in ("--set", key))]


# The served tiny models rank with the sequence signal, as the recommender preset does.
TINY_MODEL = ["train.max_epochs=1", "train.refit=false", "retrieval.sequence.weight=0.7"]


@dataclass
class Store:
    uri: str
    data: MovieLens
    champion: str  # the version promoted when the store was made

    def register_tiny_model(self, seed: int, *overrides: str) -> str:
        """Train a tiny model with this seed (and config `overrides`), log and register it (not promoted); returns its
        version."""
        import mlflow

        from ncf.integrations import mlflow_tracking
        config = load_config([*TINY_MODEL, f"train.seed={seed}", *overrides], preset=TINY)
        result = train_loop(config, self.data, LocalReporter(verbose=False), Validation(config, self.data, rank=0))
        retriever = fit_retriever(config.retrieval, self.data.splits.train_and_validation(), self.data.n_users,
                                  self.data.n_movies)
        with tempfile.TemporaryDirectory(prefix="ncf-recommender-") as tmp:
            folder = Recommender.from_training(result.model, config, self.data, retriever).save(Path(tmp))
            mlflow_tracking.setup()
            with mlflow.start_run(run_name=f"tiny-seed-{seed}"):
                return str(mlflow_tracking.log_recommender(folder, config).registered_model_version)

    def recommender(self, version: str) -> Recommender:
        """The registered version as the app loads it, for comparing answers."""
        import mlflow

        from ncf.integrations import mlflow_tracking
        model = mlflow.pyfunc.load_model(f"models:/{mlflow_tracking.MODEL_NAME}/{version}")
        return model.unwrap_python_model().recommender


@contextmanager
def tiny_champion_registry(folder: Path, movielens: MovieLens) -> Iterator[Store]:
    """A fresh MLflow store in `folder` (MLFLOW_TRACKING_URI points at it meanwhile) whose champion is a tiny model."""
    from ncf.integrations import mlflow_tracking  # here, not above: the unit layer imports no MLflow code

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        store = Store(uri, movielens, champion="")
        store.champion = store.register_tiny_model(seed=1)
        mlflow_tracking.promote(mlflow_tracking.MODEL_NAME, store.champion)
        yield store
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory, movielens: MovieLens) -> Iterator[Store]:
    """A temporary MLflow store (MLFLOW_TRACKING_URI points at it) whose champion is a tiny model."""
    with tiny_champion_registry(tmp_path_factory.mktemp("mlflow"), movielens) as store:
        yield store


@pytest.fixture(scope="module")
def own_model_store(tmp_path_factory: pytest.TempPathFactory, movielens: MovieLens) -> Iterator[Store]:
    """Like `model_store`, for one module: its tests may move the aliases."""
    with tiny_champion_registry(tmp_path_factory.mktemp("own-mlflow"), movielens) as store:
        yield store


@pytest.fixture(scope="module")
def served_url(model_store: Store) -> Iterator[str]:
    """The app on 127.0.0.1:<free port> following the store's champion (polled every 0.5 s)."""
    config = load_config([f"serve.port={free_port()}", "serve.poll_interval_s=0.5", "serve.warm_users=100",
                          "serve.min_replicas=1", "serve.max_replicas=1"]).serve
    from serving.runtime import running  # Ray Serve: imported only by the tests that serve

    with running(config, model_store.uri) as url:
        yield url
