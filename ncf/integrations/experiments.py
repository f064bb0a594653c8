"""The online experiment in the model registry and the tracking store: which experiment runs (the `champion` and
`challenger` aliases), its metrics logged over time to MLflow, and the promotion decision (`make promote`, and
Serve with serve.experiment.auto_promote).

Each experiment has one MLflow run in the MLflow experiment `RUNS_EXPERIMENT`, with a nested run per variant: the
variants log the same metric names (`ncf.online_metrics.VariantMetrics.figures`), so the MLflow UI compares them
side by side; the parent logs the difference of their positive rates. A decision is an alias move: promotion sets
`champion` on the challenger's version, then deletes `challenger`; rollback deletes `challenger`. Serve follows
both aliases by polling, so no request fails during either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from ncf.experiment import CHALLENGER, CHAMPION, ExperimentConfig, experiment_id
from ncf.feedback_store import RatingsStore
from ncf.integrations.mlflow_tracking import sqlite_path
from ncf.online_metrics import Decision, ExperimentMetrics, decide, stored_metrics

RUNS_EXPERIMENT = "ncf-online-experiments"  # the MLflow experiment holding one run per online experiment
OFFLINE_GATE_TAG = "challenger.offline_gate"  # make retrain's verdict on the challenger's version
EXPERIMENT_TAG = "ncf.experiment_id"
VARIANT_TAG = "ncf.variant"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Running:
    """The experiment the registry's aliases make: the champion's and the challenger's versions."""

    champion: ModelVersion
    challenger: ModelVersion

    @property
    def id(self) -> str:
        return experiment_id(str(self.champion.version), str(self.challenger.version))

    @property
    def versions(self) -> dict[str, str]:
        return {CHAMPION: str(self.champion.version), CHALLENGER: str(self.challenger.version)}


def alias_version(name: str, alias: str, client: MlflowClient) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def running_experiment(name: str, client: MlflowClient) -> Running | None:
    """The experiment running on registered model `name`: both aliases set, on different versions."""
    champion, challenger = alias_version(name, CHAMPION, client), alias_version(name, CHALLENGER, client)
    if champion is None or challenger is None or str(champion.version) == str(challenger.version):
        return None
    return Running(champion, challenger)


def online_metrics(running: Running, store: RatingsStore, config: ExperimentConfig,
                   catalogue: int | None = None) -> ExperimentMetrics:
    """The experiment's online metrics now, from the ratings store."""
    return stored_metrics(store, running.id, running.versions, config, catalogue)


# ----------------------------------------------------------------------------- the experiment's MLflow runs


def _runs_experiment(client: MlflowClient) -> str:
    found = client.get_experiment_by_name(RUNS_EXPERIMENT)
    if found is not None:
        return found.experiment_id
    db = sqlite_path(client.tracking_uri)
    location = (db.parent / "artifacts").resolve().as_uri() if db is not None else None
    try:
        return client.create_experiment(RUNS_EXPERIMENT, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(RUNS_EXPERIMENT).experiment_id


def experiment_runs(running: Running, client: MlflowClient) -> tuple[str, dict[str, str]]:
    """The experiment's run and its variants' nested runs (by variant), created at their first use."""
    where = _runs_experiment(client)
    found = client.search_runs([where], f"tags.`{EXPERIMENT_TAG}` = '{running.id}'", max_results=10)
    parent = next((r.info.run_id for r in found if VARIANT_TAG not in r.data.tags), None)
    if parent is None:
        parent = client.create_run(where, run_name=f"experiment {running.id}", tags={
            EXPERIMENT_TAG: running.id, **{f"ncf.{v}_version": version for v, version in running.versions.items()}
        }).info.run_id
    variants = {r.data.tags[VARIANT_TAG]: r.info.run_id for r in found if VARIANT_TAG in r.data.tags}
    for variant, version in running.versions.items():
        if variant not in variants:
            variants[variant] = client.create_run(where, run_name=f"{variant} v{version}", tags={
                EXPERIMENT_TAG: running.id, VARIANT_TAG: variant, "mlflow.parentRunId": parent,
                "ncf.model_version": version}).info.run_id
    return parent, variants


def log_online_metrics(running: Running, metrics: ExperimentMetrics, step: int, client: MlflowClient) -> str:
    """Log the metrics at `step` to the experiment's runs: each variant's to its own run under the same names, the
    difference to the parent. Returns the parent run's id."""
    parent, variants = experiment_runs(running, client)
    stamp = int(time.time() * 1000)
    for variant in (metrics.champion, metrics.challenger):
        client.log_batch(variants[variant.variant], metrics=[Metric(k, v, stamp, step)
                                                             for k, v in variant.figures().items()])
    client.log_batch(parent, metrics=[Metric(k, v, stamp, step) for k, v in metrics.figures().items()])
    return parent


# ----------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Outcome:
    running: Running
    metrics: ExperimentMetrics
    decision: Decision
    run_id: str  # the experiment's MLflow run


def promote_on_evidence(name: str, store: RatingsStore, config: ExperimentConfig, client: MlflowClient,
                        catalogue: int | None = None, running: Running | None = None) -> Outcome | None:
    """Decide the experiment running on `name` now (None: none runs) and apply the decision: promote the
    challenger (`champion` moves to its version, `challenger` is deleted) or roll it back (`challenger` deleted).
    The decision and its figures are tagged on both versions and on the experiment's run, whose runs end."""
    running = running or running_experiment(name, client)
    if running is None:
        return None
    metrics = online_metrics(running, store, config, catalogue)
    decision = decide(metrics, running.challenger.tags.get(OFFLINE_GATE_TAG), config.margin)
    now = alias_version(name, CHALLENGER, client)
    if now is None or str(now.version) != str(running.challenger.version):
        logger.warning("the challenger alias of %s moved during the decision of %s: nothing done", name, running.id)
        return None
    parent = log_online_metrics(running, metrics, int(time.time() // config.log_interval_s), client)
    tags = decision.tags(metrics, config.margin)
    for version in running.versions.values():
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    _, variants = experiment_runs(running, client)
    for key, value in tags.items():
        client.set_tag(parent, key, value)
    if decision.action == "promote":
        client.set_registered_model_alias(name, CHAMPION, str(running.challenger.version))
    client.delete_registered_model_alias(name, CHALLENGER)
    for run_id in (parent, *variants.values()):
        client.set_terminated(run_id)
    logger.info("experiment %s: %s (%s)", running.id, decision.action, decision.reason)
    return Outcome(running, metrics, decision, parent)
