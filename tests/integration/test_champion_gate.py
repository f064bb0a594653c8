"""The champion gate on a real (SQLite, temporary) MLflow registry: by default it compares the served
ranking's validation NDCG@10, higher wins; RMSE-like figures win lower."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from ncf.config import load_config
from ncf.integrations import mlflow_tracking
from workflows.champion import gate
from workflows.publish import RunSummary

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> MlflowClient:
    """One store for the module (creating a SQLite store takes seconds); each test registers its own model name."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
        mlflow_tracking.setup()
        yield MlflowClient()
        mlflow.end_run()


def candidate(client: MlflowClient, name: str, figures: dict[str, float]) -> RunSummary:
    """A finished run that logged `figures`, registered as a new version of `name` (the run stays active)."""
    run = mlflow.start_run()
    mlflow.log_metrics(figures)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    return RunSummary(run.info.run_id, {}, figures, str(version.version), name)


def test_default_gate_promotes_a_better_ranking_and_keeps_the_champion_over_a_worse_one(registry):
    config = load_config(["registry.model_name=by-ranking"])
    assert config.registry.champion_metric == "val_full_ndcg_at_10"
    name = mlflow_tracking.model_name(config)
    first = candidate(registry, name, {"val_full_ndcg_at_10": 0.10, "best_val_rmse": 0.95})
    assert gate(first, config)["champion.decision"] == "promoted"  # no champion yet
    mlflow.end_run()

    # Better ranking, worse RMSE: the default gate looks at the ranking only.
    better = candidate(registry, name, {"val_full_ndcg_at_10": 0.12, "best_val_rmse": 0.99})
    decision = gate(better, config)
    mlflow.end_run()
    assert decision["champion.decision"] == "promoted"
    assert (decision["champion.incumbent_value"], decision["champion.candidate_value"]) == ("0.100000", "0.120000")
    assert str(registry.get_model_version_by_alias(name, "champion").version) == better.model_version
    assert registry.get_run(better.run_id).data.tags["champion.metric"] == "val_full_ndcg_at_10"

    worse = candidate(registry, name, {"val_full_ndcg_at_10": 0.11, "best_val_rmse": 0.80})
    decision = gate(worse, config)
    mlflow.end_run()
    assert decision["champion.decision"] == "kept"
    assert str(registry.get_model_version_by_alias(name, "champion").version) == better.model_version


def test_an_rmse_gate_prefers_lower(registry):
    config = load_config(["registry.champion_metric=best_val_rmse", "registry.model_name=by-rmse"])
    name = mlflow_tracking.model_name(config)
    first = candidate(registry, name, {"val_full_ndcg_at_10": 0.10, "best_val_rmse": 0.95})
    gate(first, config)
    mlflow.end_run()
    lower = candidate(registry, name, {"val_full_ndcg_at_10": 0.01, "best_val_rmse": 0.90})
    assert gate(lower, config)["champion.decision"] == "promoted"
    mlflow.end_run()


def test_a_figure_the_run_lacks_is_a_clear_error(registry):
    config = load_config(["registry.champion_metric=val_full_recall_at_10", "registry.model_name=missing"])
    summary = candidate(registry, mlflow_tracking.model_name(config), {"val_full_ndcg_at_10": 0.1})
    with pytest.raises(KeyError, match="val_full_recall_at_10 is not among the run's figures"):
        gate(summary, config)


def test_models_of_other_datasets_get_their_own_registered_name():
    assert mlflow_tracking.model_name(load_config()) == "ncf-movielens"
    assert mlflow_tracking.model_name(load_config(["data.name=ml-1m"])) == "ncf-ml-1m"
    assert mlflow_tracking.model_name(load_config(["registry.model_name=mine"])) == "mine"


def test_a_champion_from_before_entry_tags_competes_with_its_runs_figure(registry):
    """A champion set by hand (or by an older gate) has no entry tag: its run's figure counts, and is recorded."""
    mlflow.end_run()  # a test before may have left its run active
    config = load_config(["registry.model_name=legacy"])
    name = mlflow_tracking.model_name(config)
    old = candidate(registry, name, {"val_full_ndcg_at_10": 0.12})
    mlflow.end_run()
    mlflow_tracking.promote(name, old.model_version, registry)
    worse = candidate(registry, name, {"val_full_ndcg_at_10": 0.11})
    decision = gate(worse, config)
    mlflow.end_run()
    assert (decision["champion.decision"], decision["champion.incumbent_version"]) == ("kept", old.model_version)
    assert str(registry.get_model_version_by_alias(name, "champion").version) == old.model_version
    tags = registry.get_model_version(name, old.model_version).tags
    assert float(tags[mlflow_tracking.entry_tag("val_full_ndcg_at_10")]) == 0.12
