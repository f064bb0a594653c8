"""`make bench-loop` (jobs.bench_loop) in miniature, in-process, on the real data with tiny models: the simulated users
keep a deliberately worse challenger (the NCF alone, no retriever) out and promote the better one (the served
recommender: retriever + sequence signal) when it challenges the worse, with no failed request during either swap."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from jobs import bench_loop
from ncf.integrations import mlflow_tracking

pytestmark = pytest.mark.integration

NAME = mlflow_tracking.MODEL_NAME
# No rounds before the experiment: the challenger meets users who have not rated the champion's lists yet (after
# such rounds its movies are new to them, a novelty effect that can even out a worse model in a run this small).
MINIATURE = ["--rounds", "0", "--experiment-rounds", "2", "--users", "400", "--set", "serve.warm_users=50"]


@pytest.fixture(scope="module")
def versions(own_model_store) -> dict[str, str]:
    """The store's tiny champion ("better") and a worse model beside it."""
    return {"better": own_model_store.champion,
            "worse": own_model_store.register_tiny_model(2, "retrieval.retriever=none")}


def run_loop(store, champion: str, challenger: str, out: Path) -> str:
    assert bench_loop.main(["--tracking-uri", store.uri, "--champion-uri", f"models:/{NAME}/{champion}",
                            "--challenger-uri", f"models:/{NAME}/{challenger}", *MINIATURE, "--out", str(out)]) == 0
    return out.read_text()


def positive_rates(report: str) -> dict[str, float]:
    return {variant: float(rate) for variant, rate in
            re.findall(r"^\| (champion|challenger) \(v\d+\) \|.*\| \*\*([\d.]+)\*\* \[", report, flags=re.MULTILINE)}


def test_a_worse_challenger_is_kept_out(own_model_store, versions, tmp_path):
    report = run_loop(own_model_store, versions["better"], versions["worse"], tmp_path / "loop.md")
    client = MlflowClient(own_model_store.uri)
    assert str(client.get_model_version_by_alias(NAME, mlflow_tracking.CHAMPION).version) == versions["better"]
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(NAME, mlflow_tracking.CHALLENGER)
    for version in versions.values():
        assert client.get_model_version(NAME, version).tags["experiment.decision"] == "rollback"
    rates = positive_rates(report)
    assert rates["challenger"] < rates["champion"], report
    assert "**rollback**" in report and "**0 failed**" in report
    assert re.search(r"During the swap: [1-9]\d* requests", report), report
    assert "| experiment-2 |" in report


def test_a_better_challenger_is_promoted(own_model_store, versions, tmp_path):
    report = run_loop(own_model_store, versions["worse"], versions["better"], tmp_path / "loop.md")
    client = MlflowClient(own_model_store.uri)
    assert str(client.get_model_version_by_alias(NAME, mlflow_tracking.CHAMPION).version) == versions["better"]
    rates = positive_rates(report)
    assert rates["challenger"] > rates["champion"], report
    assert "**promote**" in report and "**0 failed**" in report
