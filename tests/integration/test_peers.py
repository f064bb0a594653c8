"""`make peers` end to end on the tiny dataset: every peer a run of the MLflow experiment `peers` in a real store,
with the training runs' metric names, its protocol's tag and its data as dataset inputs; both protocols' tables in
the report. SASRec runs only where the peers virtualenv (`.venv-peers`, built by `make peers`) exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from jobs.peers import main
from workflows.peers import PRESETS, REFERENCE
from workflows.peers_runs import EXPERIMENT, PROTOCOL_TAG

pytestmark = pytest.mark.integration

PEERS_PYTHON = Path(__file__).resolve().parents[2] / ".venv-peers" / "bin" / "python"
# What the project's training runs log for the served model's test full ranking (`log_test_metrics`).
TEST_METRICS = {"test_full_ndcg_at_10", "test_full_hit_rate_at_10", "test_full_recall_at_10",
                "test_full_precision_at_10", "test_full_map_at_10", "test_full_coverage", "test_full_users"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI")
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory, tiny_dir, tiny_config) -> list[str]:
    """The job's data and outputs: the tiny dataset, one epoch of each preset, a record and report of the test's."""
    out = tmp_path_factory.mktemp("peers")
    sha256 = tiny_config.data.datasets["ml-latest-small"].sha256
    return ["--data-dir", str(tiny_dir), "--record", str(out / "peers.json"), "--out", str(out / "peers.md"),
            "--set", f"data.datasets.ml-latest-small.sha256={sha256}",
            "--set", f"data.prepared_dir={tiny_config.data.prepared_dir}", "--set", "train.max_epochs=1"]


@pytest.fixture(scope="module")
def measured(store, tiny_args) -> Path:
    assert main(["--protocol", "seed", *tiny_args]) == 0
    assert main(["--protocol", "temporal", "--peers", "most_popular", REFERENCE, *tiny_args]) == 0
    return Path(tiny_args[tiny_args.index("--out") + 1])


def runs_of(protocol: str) -> dict[str, object]:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, "the peers experiment exists"
    runs = client.search_runs([experiment.experiment_id], f"tags.`{PROTOCOL_TAG}` = '{protocol}'")
    return {run.data.tags["peers.peer"]: run for run in runs}


def test_every_peer_is_one_run_of_the_peers_experiment(measured):
    seed = runs_of("seed")
    assert sorted(seed) == sorted(["most_popular", "ease", "als", "itemknn", "history", *PRESETS])  # no venv: no SASRec
    for peer, run in seed.items():
        assert run.info.run_name == f"peer {peer} ml-latest-small (seed)"
        assert set(run.data.metrics) >= TEST_METRICS, peer
        assert 0.0 <= run.data.metrics["test_full_ndcg_at_10"] <= 1.0
        assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {"ml-latest-small/train",
                                                                       "ml-latest-small/test"}, peer
        if peer != REFERENCE:
            low, high = (run.data.metrics[f"test_full_ndcg_at_10_minus_{REFERENCE}_{end}"] for end in ("low", "high"))
            assert low <= run.data.metrics[f"test_full_ndcg_at_10_minus_{REFERENCE}"] <= high
    assert "retrieval.ease.regularization" in seed["ease"].data.params
    assert sorted(runs_of("temporal")) == ["ease", "most_popular"]


def test_the_report_has_a_table_per_protocol(measured):
    text = measured.read_text()
    assert "## seed" in text and "## temporal" in text
    assert text.count("| ease |") == 2 and "| recommender |" in text


@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason="SASRec needs the peers virtualenv: `make peers` builds "
                                                     ".venv-peers (rectools; never in the project's .venv)")
def test_sasrec_from_the_peers_virtualenv(measured, tiny_args):
    assert main(["--protocol", "seed", "--peers", "sasrec", "--sasrec-python", str(PEERS_PYTHON),
                 "--sasrec-epochs", "1", *tiny_args]) == 0
    run = runs_of("seed")["sasrec"]
    assert set(run.data.metrics) >= TEST_METRICS
    assert {"test_full_ndcg_at_10_sd", "seed_2/test_full_ndcg_at_10"} <= set(run.data.metrics)
    assert run.data.params["loss"].startswith("softmax")
    assert "| sasrec |" in measured.read_text()
