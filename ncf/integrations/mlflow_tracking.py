"""MLflow glue: where runs go, what each run records, and the registered recommender model.

`MLFLOW_TRACKING_URI` selects the store; without it, SQLite at `./mlruns/mlflow.db`
in the working directory with artifacts under `./mlruns/artifacts` (made absolute,
so Ray workers and `make ui` agree). The driver creates the experiment once before
any worker logs (concurrent creation of a fresh SQLite store crashes).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from ncf.config import Config, flatten, save_config
from ncf.config_files import PACKAGE_DIR

# The registry's aliases: `champion`, served; `challenger`, a retrained version that passed the offline gate.
from ncf.experiment import CHALLENGER, CHAMPION  # noqa: F401 (CHALLENGER: for the modules that move it)

EXPERIMENT = "ncf-movielens"
MODEL_NAME = "ncf-movielens"  # the registered model of ml-latest-small; other datasets get ncf-<dataset>
DEFAULT_DATASET = "ml-latest-small"


def model_name(config: Config) -> str:
    """`registry.model_name`, else one registered model per dataset: models trained on different data
    never compete for one `champion` alias."""
    if config.registry.model_name:
        return config.registry.model_name
    return MODEL_NAME if config.data.name == DEFAULT_DATASET else f"ncf-{config.data.name}"
logger = logging.getLogger(__name__)


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
    """Logs each epoch's metrics to a run by id: usable from any process (rank 0, a trial).

    The store may be unreachable for a while (a tracking server restarting): training never waits for it. Each
    epoch's metrics join a buffer that a background thread sends, oldest first, retrying with backoff (1 s doubling
    up to `max_backoff_s`) until the store answers; the metrics keep the time they were logged. MLflow's client
    retries each request itself first (MLFLOW_HTTP_REQUEST_MAX_RETRIES and _BACKOFF_FACTOR: by default for minutes),
    so a send may also succeed late rather than fail. `flush()` waits until all are sent: whoever trains calls it
    before the run ends (the jobs do), since metrics still buffered when the process exits are lost.
    """

    BATCH = 1000  # the most metrics one log_batch request takes

    def __init__(self, run_id: str, uri: str | None = None, max_backoff_s: float = 10.0):
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri or tracking_uri())
        self.max_backoff_s = max_backoff_s
        self.failed_sends = 0  # attempts that failed so far (the store was unreachable or refused)
        self.last_error: Exception | None = None
        self._pending: list[Metric] = []  # oldest first; a batch leaves only once the store took it
        self._changed = threading.Condition()
        self._sender: threading.Thread | None = None

    def __call__(self, metrics: dict[str, float]) -> None:
        step = int(metrics["epoch"])
        stamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), stamp, step) for key, value in metrics.items() if key != "epoch"]
        with self._changed:
            self._pending.extend(batch)
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_all, name=f"mlflow-epochs-{self.run_id[:8]}",
                                                daemon=True)
                self._sender.start()

    @property
    def pending(self) -> int:
        """Metrics not sent yet."""
        with self._changed:
            return len(self._pending)

    def _send_all(self) -> None:
        """The sender thread: sends until the buffer is empty, then ends (the next epoch starts another)."""
        backoff = 1.0
        while True:
            with self._changed:
                if not self._pending:
                    self._sender = None
                    self._changed.notify_all()
                    return
                batch = self._pending[:self.BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # unreachable, or answering errors: keep the batch, try again later
                with self._changed:
                    self.failed_sends += 1
                    self.last_error = err
                    if self.failed_sends == 1 or backoff >= self.max_backoff_s:
                        logger.warning("MLflow store unreachable (%s); %d metric(s) of run %s buffered, retrying",
                                       err, len(self._pending), self.run_id)
                time.sleep(backoff)
                backoff = min(2 * backoff, self.max_backoff_s)
                continue
            backoff = 1.0
            with self._changed:
                del self._pending[:len(batch)]
                self._changed.notify_all()

    def flush(self, timeout_s: float = 600.0) -> None:
        """Wait until every metric logged so far is in the store; raise if that takes over `timeout_s` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: not self._pending, timeout=timeout_s):
                raise MlflowException(f"{len(self._pending)} metric(s) of run {self.run_id} not logged after "
                                      f"{timeout_s:g} s: the store at {self.client.tracking_uri} is unreachable "
                                      f"({self.last_error})")


def log_config(config: Config) -> None:
    """The resolved config: every value as a param (of the datasets, only the one used), the file as an artifact."""
    own = f"data.datasets.{config.data.name}."
    mlflow.log_params({key: value for key, value in flatten(config).items()
                       if not key.startswith("data.datasets.") or key.startswith(own)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        save_config(config, path)
        mlflow.log_artifact(str(path))


def run_name(job: str, config: Config) -> str:
    """What a run is, as the MLflow runs table shows it: the job, the preset and the dataset
    ("train recommender ml-latest-small")."""
    return f"{job} {config.preset} {config.data.name}"


# Each split as the MLflow dataset input it is to a run, with the context the runs table shows.
SPLIT_CONTEXTS = {"train": "training", "validation": "validation", "test": "evaluation"}
RATINGS_SCHEMA = Schema([ColSpec("long", "user"), ColSpec("long", "movie"), ColSpec("double", "rating"),
                         ColSpec("long", "timestamp")])


def log_data_inputs(data, config: Config) -> None:
    """The run's training, validation and evaluation data as MLflow dataset inputs (name `<dataset>/<split>`, the
    split's digest, the dataset's published source), so the runs table and the lineage say which data a model saw."""
    source = HTTPDatasetSource(config.data.published.url)
    for split, context in SPLIT_CONTEXTS.items():
        ratings = getattr(data.splits, split)
        if len(ratings):
            mlflow.log_input(MetaDataset(source, name=f"{config.data.name}/{split}", digest=ratings.digest(),
                                         schema=RATINGS_SCHEMA), context=context)


def log_test_metrics(models: dict[str, dict[str, float]], primary: str = "ncf") -> None:
    """`test_<metric>` for the model; `baselines/<name>/test_<metric>` for the others (spaces become _)."""
    for name, metrics in models.items():
        prefix = "test_" if name == primary else f"baselines/{name.replace(' ', '_')}/test_"
        mlflow.log_metrics({prefix + key: value for key, value in metrics.items()})


# ----------------------------------------------------------------------------- model


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc face of `ncf.recommender.Recommender` (the registered model).

    Input with `user_id` and `movie_id`: one row per pair. Input with `user_id`
    only: the top-k (param `k`, default 10) unseen movies of each user, ranked by
    `Recommender.rank_profiles` with the user's stored ratings as profile. Unknown
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


# The pyfunc's name before it was RecommenderPyfunc. Versions registered then hold a pickle of
# `ncf.integrations.mlflow_tracking.RecommenderModel` (cloudpickle saves the class by import path), resolved
# against whichever `ncf` the loading process has imported: in Serve and the jobs that is this one, not the
# copy logged beside the model. Those versions load only while the old name stays importable.
RecommenderModel = RecommenderPyfunc


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("long", "user_id"), ColSpec("long", "movie_id", required=False)]),
    params=ParamSchema([ParamSpec("k", "long", 10)]),
)


def pip_requirements() -> list[str]:
    return [f"{name}=={version(name).split('+')[0]}"
            for name in ("mlflow", "torch", "numpy", "pandas", "pyyaml", "pydantic", "scipy", "threadpoolctl")]


def log_recommender(recommender_dir: Path, config: Config, register: bool = True) -> mlflow.models.model.ModelInfo:
    """Log the pyfunc with its artifacts and the `ncf` code, and register it under `model_name(config)`."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=RecommenderPyfunc(),
        artifacts={"recommender": str(recommender_dir)},
        code_paths=[str(PACKAGE_DIR)],  # the whole `ncf` package: the model loads without this repo
        pip_requirements=pip_requirements(),
        signature=SIGNATURE,
        registered_model_name=model_name(config) if register else None,
    )


def load_recommender(model_uri: str, dst_path: str):
    """The `ncf.recommender.Recommender` inside a registered version."""
    return mlflow.pyfunc.load_model(model_uri, dst_path=dst_path).unwrap_python_model().recommender


def load_id_maps(model_uri: str):
    """The `ncf.data.IdMaps` of a registered version, downloading only its ids file (not the whole model):
    enough to plan work over its users before anything loads the model."""
    from ncf.data import IdMaps
    from ncf.recommender import IDS

    folder = mlflow.models.Model.load(model_uri).flavors["python_function"]["artifacts"]["recommender"]["path"]
    with tempfile.TemporaryDirectory(prefix="ncf-ids-") as tmp:
        return IdMaps.load(Path(mlflow.artifacts.download_artifacts(f"{model_uri}/{folder}/{IDS}", dst_path=tmp)))


def describe_version(config: Config, version: str, description: str, tags: dict[str, str],
                     client: MlflowClient | None = None) -> None:
    """A description and tags on the registered version, so the registry page says what it is."""
    client = client or MlflowClient()
    name = model_name(config)
    client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def champion_version(name: str = MODEL_NAME,
                     client: MlflowClient | None = None) -> mlflow.entities.model_registry.ModelVersion | None:
    client = client or MlflowClient()
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def promote(name: str, version: str, client: MlflowClient | None = None) -> None:
    (client or MlflowClient()).set_registered_model_alias(name, CHAMPION, version)


def entry_tag(metric: str) -> str:
    """The version tag holding a version's figure once it entered the champion gate on `metric`."""
    return f"champion.value.{metric}"


def _entries(name: str, metric: str, client: MlflowClient) -> dict[str, float]:
    """Every version of `name` that entered the gate on `metric`, with its (finite) figure."""
    key, found, token = entry_tag(metric), {}, None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        for entry in page:
            try:
                value = float(entry.tags.get(key, "nan"))
            except ValueError:
                continue
            if math.isfinite(value):
                found[str(entry.version)] = value
        token = page.token
        if not token:
            return found


def _incumbent_figure(name: str, incumbent, metric: str, client: MlflowClient) -> float | None:
    """The champion's figure: its entry tag, else (a champion from before entry tags) the `metric` its run
    logged, then written as its entry tag so that every gate running now compares against it."""
    recorded = incumbent.tags.get(entry_tag(metric))
    if recorded is not None:
        return float(recorded)
    value = client.get_run(incumbent.run_id).data.metrics.get(metric) if incumbent.run_id else None
    if value is not None:
        client.set_model_version_tag(name, str(incumbent.version), entry_tag(metric), repr(float(value)))
    return value


def promote_if_better(name: str, version: str, value: float, metric: str, lower_is_better: bool,
                      client: MlflowClient | None = None, max_rounds: int = 50) -> dict[str, str]:
    """Enter `version` in `name`'s champion gate on `metric`; the alias ends on the best entry.

    Several gates may run at once (two sweeps finishing together) against any store, with no lock.
    Read-compare-set alone is not safe: both read the old champion, and the worse one's alias
    write can land last. So each gate (1) records its figure as a version tag (`entry_tag`) before
    touching the alias, then (2) repeats "read every entry, then read the alias; if the alias is not
    on the best entry, set it there" until a round changes nothing. Ties go to the older version.

    Why it converges whatever the interleaving: every alias write is followed by a check round of
    the same gate, and every entry tag is written before its gate's first round. Take the gate whose
    last round started last: that round read every entry (all tags were written before any gate's
    last round) and found the alias on the best one; no alias write comes after it, since that
    write's own check round would have started later. So the alias ends on the best of all entries.
    Rounds end: entries only grow and a gate only moves the alias when another wrote a stale best,
    so `max_rounds` is never reached with a few concurrent gates. A version stops competing when its
    entry tag is deleted (the way to retire a champion for good: moving the alias by hand is undone by
    the next gate when an entry beats the version moved to).

    A champion from before entry tags competes with the `metric` its run logged (none: it counts as
    beaten). Returns the decision and both figures (the displaced champion's, or the one that stays),
    as tags for the runs to record.
    """
    client = client or MlflowClient()
    client.set_model_version_tag(name, version, entry_tag(metric), repr(float(value)))
    before = champion_version(name, client)
    before_value = _incumbent_figure(name, before, metric, client) if before is not None else None
    champion = _settle(name, metric, lower_is_better, client, max_rounds)
    promoted = champion == str(version)
    if promoted:  # the incumbent is the champion it displaced
        displaced = before is not None and str(before.version) != str(version)
        incumbent_version = str(before.version) if displaced else "none"
        incumbent_value = before_value if displaced else None
    else:  # the incumbent is the champion that stays
        incumbent_version = champion or "none"
        incumbent_value = _entries(name, metric, client).get(champion) if champion else None
    return {
        "champion.decision": "promoted" if promoted else "kept",
        "champion.metric": metric,
        "champion.candidate_version": version,
        "champion.candidate_value": f"{value:.6f}",
        "champion.incumbent_version": incumbent_version,
        "champion.incumbent_value": f"{incumbent_value:.6f}" if incumbent_value is not None else "none",
    }


def _settle(name: str, metric: str, lower_is_better: bool, client: MlflowClient, max_rounds: int) -> str | None:
    """Move the alias to the best entry until a round finds it there; the champion's version (None: no entry)."""
    for _ in range(max_rounds):
        entries = _entries(name, metric, client)  # entries first, then the alias: the order the argument needs
        if not entries:
            return None
        best = min(entries, key=lambda v: (entries[v] if lower_is_better else -entries[v], int(v)))
        holder = champion_version(name, client)
        if holder is not None and str(holder.version) == best:
            return best
        promote(name, best, client)
    raise MlflowException(f"the {CHAMPION} alias of {name} did not settle after {max_rounds} rounds")
