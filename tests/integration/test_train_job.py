"""The train job end to end on a real local Ray cluster and a real MLflow store."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
from mlflow import MlflowClient

from ncf.config import load_config
from ncf.evaluation import evaluate
from ncf.integrations import mlflow_tracking
from ncf.integrations.ray_train import fit_with_ray
from ncf.prepared import load_movielens
from ncf.recommender import ModelAlone
from ncf.training.checkpoints import load_checkpoint, model_from_checkpoint
from workflows.training_run import train_and_publish

pytestmark = pytest.mark.integration

SMALL_MODEL = ["model.embedding_dim=32", "model.hidden_dims=[64, 32]", "model.dropouts=[0.1, 0.0]"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A fresh MLflow store for this module; the env var is what every process reads."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    yield uri
    os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI")
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="module")
def trained(store, local_ray, data_dir, tmp_path_factory):
    config = load_config([*SMALL_MODEL, "train.max_epochs=3", f"data.dir={data_dir}",
                          f"train.checkpoint_dir={tmp_path_factory.mktemp('ckpt')}"])
    report = tmp_path_factory.mktemp("reports") / "metrics.json"
    summary, promoted = train_and_publish(config, launcher="ray", report_path=report)
    return summary, promoted, report


def test_run_records_everything(trained, store, data_dir):
    summary, promoted, report = trained
    client = MlflowClient(store)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.embedding_dim"] == "32"
    assert run.data.params["train.seed"] == "42"
    assert run.data.tags["data.split.test"] == "20417"
    assert run.data.tags["data.sha256.ratings.csv"].startswith("80da8b33")
    # The runs table says what the run is and which data it saw: each split as a dataset input with its digest.
    assert run.info.run_name == "train deck ml-latest-small"
    data = load_movielens(load_config().data, data_dir)
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["ml-latest-small/test", "ml-latest-small/train", "ml-latest-small/validation"]
    for split, context in (("train", "training"), ("validation", "validation"), ("test", "evaluation")):
        logged = inputs[f"ml-latest-small/{split}"]
        assert logged.dataset.digest == getattr(data.splits, split).digest()
        assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == context
    for name in ("test_rmse", "test_mae", "test_precision_at_10", "test_recall_at_10", "test_f_at_10",
                 "test_ndcg_at_10", "test_full_ndcg_at_10", "test_full_hit_rate_at_10",
                 "test_sampled_hr_at_10", "test_sampled_ndcg_at_10", "val_full_ndcg_at_10", "best_val_rmse",
                 "baselines/user_item_bias/test_rmse", "baselines/most_popular/test_full_ndcg_at_10",
                 "baselines/ease/test_full_ndcg_at_10", "baselines/als/test_full_ndcg_at_10",
                 "baselines/ncf_model_alone/test_full_ndcg_at_10"):
        assert name in run.data.metrics, name
    assert 0.8 < run.data.metrics["test_rmse"] < 1.0
    val_curve = client.get_metric_history(summary.run_id, "val_rmse")
    assert sorted(m.step for m in val_curve) == list(range(1, len(val_curve) + 1))
    # The served ranking's validation NDCG every epoch, then the figure of the chosen re-ranking after them.
    ndcg = sorted(client.get_metric_history(summary.run_id, "val_full_ndcg_at_10"), key=lambda m: m.step)
    assert [m.step for m in ndcg[:-1]] == list(range(1, len(val_curve) + 1))
    assert ndcg[-1].step > max(m.step for m in client.get_metric_history(summary.run_id, "train_loss"))
    assert run.data.metrics["val_full_ndcg_at_10"] == ndcg[-1].value  # the run's answer: the chosen re-ranking
    assert "validation/reranking_grid.json" in {a.path for a in client.list_artifacts(summary.run_id, "validation")}
    assert len(client.get_metric_history(summary.run_id, "train_loss")) >= 3
    assert any(key.startswith("system/") for key in run.data.metrics), "system metrics are logged"
    plots = {a.path for a in client.list_artifacts(summary.run_id, "plots")}
    assert plots == {f"plots/{n}.png" for n in ("learning_curves", "ratings_predicted_vs_true",
                                                "movie_embeddings", "attention_weights")}
    assert "config.yaml" in {a.path for a in client.list_artifacts(summary.run_id)}

    assert promoted and run.data.tags["champion.decision"] == "promoted"
    assert run.data.tags["champion.incumbent_version"] == "none"
    assert run.data.tags["champion.metric"] == "val_full_ndcg_at_10"  # the default gate
    champion = client.get_model_version_by_alias(mlflow_tracking.MODEL_NAME, mlflow_tracking.CHAMPION)
    assert str(champion.version) == summary.model_version and champion.run_id == summary.run_id
    assert champion.tags["preset"] == "deck" and champion.tags["objective"] == "rating"
    assert champion.tags["data.sha256.ratings.csv"] == run.data.tags["data.sha256.ratings.csv"]
    assert "deck preset" in champion.description and "full NDCG@10" in champion.description

    written = json.loads(report.read_text())
    assert written["split"] == {"train": 72115, "validation": 8304, "test": 20417}
    assert written["models"]["ncf"]["rmse"] == pytest.approx(run.data.metrics["test_rmse"])
    assert {"global_mean", "user_item_bias", "most_popular", "ease", "als", "ncf model alone"} <= set(written["models"])


FRESH_PROCESS = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/ncf-movielens@champion")
top = model.predict(pd.DataFrame({"user_id": [1]}), params={"k": 10})
pairs = model.predict(pd.DataFrame({"user_id": [1, 1, 2], "movie_id": [1, 50, 318]}))
try:
    model.predict(pd.DataFrame({"user_id": [999999], "movie_id": [1]}))
    unknown = "no error"
except Exception as err:
    unknown = str(err)
print(json.dumps({"top": top.to_dict("list"), "pairs": pairs.to_dict("list"), "unknown": unknown}))
"""


def test_registered_model_loads_in_fresh_process(trained, store, data_dir, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    top, pairs = out["top"], out["pairs"]
    assert top["rank"] == list(range(1, 11)) and set(top["user_id"]) == {1}
    assert all(isinstance(t, str) and t for t in top["title"])
    # The fresh process ranks exactly as this one does (retrieval, then re-ranking, inside the pyfunc).
    here = mlflow.pyfunc.load_model("models:/ncf-movielens@champion").predict(pd.DataFrame({"user_id": [1]}),
                                                                             params={"k": 10})
    assert top["movie_id"] == here["movie_id"].tolist()
    data = load_movielens(load_config([f"data.dir={data_dir}"]).data)
    known = data.splits.train_and_validation()
    rated_by_user_1 = set(data.ids.movie_ids[known.movie[known.user == data.ids.user_index([1])[0]]].tolist())
    assert len(rated_by_user_1) > 100
    assert not rated_by_user_1 & set(top["movie_id"])
    weights = np.array(pairs["user_weight"]) + np.array(pairs["movie_weight"])
    np.testing.assert_allclose(weights, 1.0, atol=1e-6)
    assert all(0.5 <= r <= 5.0 for r in pairs["predicted_rating"])
    assert "999999" in out["unknown"]


def test_versions_registered_under_the_pyfuncs_former_name_still_load():
    """A version logged before the pyfunc was renamed holds a pickle of `RecommenderModel` by import path."""
    logged_then = pickle.dumps(mlflow_tracking.RecommenderPyfunc(), protocol=0).replace(
        b"\nRecommenderPyfunc\n", b"\nRecommenderModel\n")
    assert b"RecommenderModel" in logged_then
    assert isinstance(pickle.loads(logged_then), mlflow_tracking.RecommenderPyfunc)


def _checkpoint_registered(storage: Path) -> bool:
    """Whether Ray Train registered a checkpoint of the run: its controller's snapshot names a latest one. A
    checkpoint only written is not resumed from (the controller may register it epochs later on a busy machine):
    a worker killed before then makes the run start over."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(OSError, ValueError):  # being rewritten
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
    return False


def _kill_worker_once_a_checkpoint_is_registered(storage: Path, address: str, outcome: list,
                                                 stop: threading.Event) -> None:
    """Once Ray Train registered a checkpoint of the run, kills the worker's process.

    The worker is looked up as soon as a checkpoint is written: the state API can take seconds on a busy
    machine, and looked up later, the kill could land after the last epoch, with nothing to resume.
    """
    from ray.util.state import list_actors

    pid = None
    try:
        while not stop.is_set():
            if pid is None and any(storage.glob("*/checkpoint_*/")):
                workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"),
                                                                ("state", "=", "ALIVE")])
                pid = workers[0].pid if workers else None
            if pid is not None and _checkpoint_registered(storage):
                os.kill(pid, 9)
                outcome.append(pid)
                return
            time.sleep(0.2)
    except Exception as err:  # surfaced by the test, not lost in the thread
        outcome.append(err)


def test_killed_worker_is_replaced_and_training_resumes(store, local_ray, data_dir, tmp_path):
    # Batches of 256 (4x slower epochs than the default's 4096): the kill must land while epochs remain.
    overrides = [*SMALL_MODEL, "train.max_epochs=6", "train.patience=10", "train.refit=false",
                 "train.batch_size=256", "train.learning_rate=0.001", f"data.dir={data_dir}"]
    data = load_movielens(load_config(overrides).data)

    def test_rmse(storage: Path) -> tuple[float, dict]:
        config = load_config([*overrides, f"train.checkpoint_dir={storage}"])
        checkpoint = fit_with_ray(config, data_dir, run_id=None, into=storage / "final")
        state = load_checkpoint(checkpoint)["state"]
        model = model_from_checkpoint(checkpoint, config, data)
        return evaluate(ModelAlone(model), data, evaluation=config.evaluation)["rmse"], state

    undisturbed, _ = test_rmse(tmp_path / "undisturbed")

    killed: list = []
    stop = threading.Event()
    address = ray.get_runtime_context().gcs_address
    killer = threading.Thread(target=_kill_worker_once_a_checkpoint_is_registered,
                              args=(tmp_path / "disturbed", address, killed, stop))
    killer.start()
    try:
        disturbed, state = test_rmse(tmp_path / "disturbed")
    finally:
        stop.set()
        killer.join()
    assert killed and isinstance(killed[0], int), f"a training worker was killed mid-run: {killed}"
    assert state["resumed"] >= 1, "the replacement worker resumed from a checkpoint"
    assert [h["epoch"] for h in state["history"]] == list(range(1, 7))
    assert abs(disturbed - undisturbed) <= 0.01, (disturbed, undisturbed)


def test_make_ui_serves_the_same_store(trained, store):
    """`make ui` on a free port shows the experiment and the training run."""
    import signal
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    ui = subprocess.Popen(["make", "-s", "ui", f"UI_PORT={port}"], cwd=repo, start_new_session=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": store},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body, deadline = None, time.time() + 90
        while body is None and time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?"
                                            "max_results=10", timeout=5) as response:
                    body = json.loads(response.read())
            except OSError:
                time.sleep(1)
        assert body is not None, "the MLflow UI did not answer"
        assert mlflow_tracking.EXPERIMENT in [e["name"] for e in body["experiments"]]
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
