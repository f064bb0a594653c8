"""`make retrain` end to end on the tiny dataset, over a real MLflow store and a real SQLite ratings store: a champion
trained by the train job, live ratings stored, the retrain job run as a subprocess (Ray Train, then in-process);
the challenger registered with the live ratings it saw (run, version, prepared manifest), the alias `challenger`
when the offline gate passes and none when it fails; no champion or no live ratings: exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from jobs import retrain as retrain_job
from ncf import live_training
from ncf.config import load_config
from ncf.feedback_store import RatingEvent, RatingsStore
from ncf.integrations import mlflow_tracking
from ncf.prepared import load_movielens
from workflows.training_run import train_and_publish

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "ml-tiny"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("retrain")


@pytest.fixture(scope="module")
def data_overrides(work: Path, tiny_config) -> list[str]:
    """The tiny dataset (verified against its own checksums), its prepared copies and checkpoints in `work`."""
    return [f"data.dir={TINY}", f"data.datasets.ml-latest-small.sha256={dict(tiny_config.data.published.sha256)}",
            f"data.prepared_dir={work / 'prepared'}", f"data.cache_dir={work / 'cache'}",
            f"train.checkpoint_dir={work / 'checkpoints'}"]


@pytest.fixture(scope="module")
def env(work: Path) -> dict[str, str]:
    """The MLflow store and ratings store every process of this module uses; no NCF_DATA_DIR (it would win over
    data.dir)."""
    previous = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "NCF_DATA_DIR")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    os.environ.pop("NCF_DATA_DIR", None)
    yield {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def run_retrain(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.retrain", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def set_args(overrides: list[str]) -> list[str]:
    return [arg for key in overrides for arg in ("--set", key)]


@pytest.fixture(scope="module")
def champion(env, data_overrides, tiny_training_overrides) -> str:
    """No champion yet: exit 2. Then the tiny model trained in-process, registered and made champion."""
    assert retrain_job.main(set_args(data_overrides)) == 2
    config = load_config([*data_overrides, *tiny_training_overrides], preset="tiny")
    summary, promoted = train_and_publish(config, launcher="local", report_path=None)
    assert promoted
    return summary.model_version


@pytest.fixture(scope="module")
def live(champion, data_overrides) -> list[RatingEvent]:
    """No live ratings yet: exit 2. Then the tiny data's test ratings as live ones, in time order, plus a new
    user's ratings."""
    assert retrain_job.main(set_args(data_overrides)) == 2
    data = load_movielens(load_config(data_overrides).data, TINY)
    test = data.splits.test
    order = np.argsort(test.timestamp, kind="stable")
    store = RatingsStore(os.environ["NCF_FEEDBACK_URI"])
    newcomer = store.new_user(int(data.ids.user_ids.max()))
    events = [RatingEvent(f"t{i}", int(data.ids.user_ids[test.user[i]]), int(data.ids.movie_ids[test.movie[i]]),
                          float(test.rating[i]), int(test.timestamp[i]), None) for i in order]
    popular = np.argsort(-np.bincount(data.splits.train.movie, minlength=data.n_movies))[:5]
    events[100:100] = [RatingEvent(f"n{i}", newcomer, int(data.ids.movie_ids[m]), 4.5, None, None)
                       for i, m in enumerate(popular)]
    assert set(store.add(events)) == {"stored"}
    store.close()
    return events


def test_no_champion_and_no_live_ratings_exit_2_saying_so(live, capsys):
    """(Asserted by the fixtures, in order; here what they printed.)"""
    assert retrain_job.main(["--set", "registry.model_name=nobody"]) == 2
    err = capsys.readouterr().err
    assert "error: no champion version of nobody" in err and "Traceback" not in err


def test_retrain_registers_a_challenger_that_passes_the_gate(live, champion, env, data_overrides,
                                                               tiny_training_overrides, work: Path):
    done = run_retrain([*set_args([*data_overrides, *tiny_training_overrides]),
                        "--set", "retrain.validation_tolerance=1.0"], env, work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "offline gate passed, alias challenger" in done.stdout, done.stdout[-3000:]
    client = MlflowClient()
    name = mlflow_tracking.MODEL_NAME
    challenger = client.get_model_version_by_alias(name, mlflow_tracking.CHALLENGER)
    assert str(client.get_model_version_by_alias(name, mlflow_tracking.CHAMPION).version) == champion  # untouched
    assert str(challenger.version) != champion

    live_ratings = RatingsStore(os.environ["NCF_FEEDBACK_URI"]).ratings()
    cut = live_training.cut(live_ratings, 0.2)
    tags = challenger.tags
    assert tags["challenger.offline_gate"] == "passed"
    assert (tags["retrain.cut_seq"], tags["retrain.live_ratings"], tags["retrain.live_sha256"],
            tags["retrain.holdout_ratings"]) == (str(cut.cut_seq), str(len(cut.training)), cut.sha256,
                                                 str(len(cut.holdout)))
    assert len(live) == len(live_ratings) == len(cut.training) + len(cut.holdout)
    assert f"Retrained with {len(cut.training)} live ratings (seq up to {cut.cut_seq}" in challenger.description
    run = client.get_run(challenger.run_id)
    assert run.data.tags["retrain.live_sha256"] == cut.sha256 and run.data.tags["retrain.champion_version"] == champion
    for model in ("champion_frozen", "champion_served", "challenger"):
        assert 0 <= run.data.metrics[f"holdout/{model}/full_ndcg_at_10"] <= 1
    assert run.data.metrics["holdout_ndcg_minus_champion_served_high"] >= 0

    manifest = json.loads((live_training.live_location(work / "cache" / "retrain", cut, "ml-latest-small")
                           / "manifest.json").read_text())
    assert manifest["live"] | {"base_build": None} == {
        **cut.record(), "trained_ratings": len(cut.training), "unknown_movies": 0, "new_users": 1,
        "superseded_dataset_ratings": len(cut.training) - 5, "base_build": None}  # every test pair but the newcomer's
    assert json.loads(Path(client.download_artifacts(run.info.run_id, "retrain/live.json")).read_text()) \
        == manifest["live"]
    assert run.data.params["model.embedding_dim"] == "16"  # the champion's settings (the tiny preset's)


def test_a_challenger_that_fails_the_gate_gets_no_alias(live, champion, env, data_overrides,
                                                        tiny_training_overrides, work: Path):
    client = MlflowClient()
    name = mlflow_tracking.MODEL_NAME
    client.delete_registered_model_alias(name, mlflow_tracking.CHALLENGER)
    done = run_retrain(["--launcher", "local", *set_args([*data_overrides, *tiny_training_overrides]),
                        "--set", "retrain.validation_tolerance=-1"], env, work)  # must beat NDCG by 1: impossible
    assert done.returncode == 0, done.stderr[-3000:]
    assert "offline gate failed" in done.stdout, done.stdout[-3000:]
    latest = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert latest.tags["challenger.offline_gate"] == "failed"
    assert "worse than the champion's" in latest.tags["challenger.offline_gate_reason"]
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, mlflow_tracking.CHALLENGER)
    assert str(client.get_model_version_by_alias(name, mlflow_tracking.CHAMPION).version) == champion
