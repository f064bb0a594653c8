"""`model.architecture: history` end to end: data-parallel on two Ray Train workers of a real local Ray cluster,
logged and registered in a real MLflow store, its registered model scoring from the histories it was saved with,
and served over HTTP, where a visitor's own ratings change what the model itself says of them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from services import private_ray

from ncf.config import Config, load_config
from ncf.ports import free_port
from serving.runtime import running
from workflows.training_run import train_and_publish

pytestmark = pytest.mark.integration


def test_the_history_model_trains_on_two_workers_registers_and_serves(tiny_config: Config, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.delenv("NCF_DATA_DIR", raising=False)  # it would win over data.dir
    data = tiny_config.data
    config = load_config(["model.architecture=history", "model.objective=joint", "model.history_length=20",
                          "train.num_workers=2", "train.cpus_per_worker=1", "train.max_epochs=2", "train.patience=5",
                          "train.refit=true", "train.batch_size=256", f"data.dir={data.dir}",
                          f"data.prepared_dir={data.prepared_dir}",
                          f"data.datasets.ml-latest-small.sha256={json.dumps(data.published.sha256)}",
                          f"train.checkpoint_dir={tmp_path / 'checkpoints'}"], preset="tiny")
    with private_ray():
        summary, _ = train_and_publish(config, launcher="ray", report_path=tmp_path / "metrics.json")

    client = MlflowClient()
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.architecture"] == "history"
    assert 0.5 < run.data.metrics["test_rmse"] < 2.0
    for rank in (0, 1):  # both workers trained, each on its half of every epoch
        samples = [m.value for m in client.get_metric_history(summary.run_id, f"worker/{rank}/samples")]
        assert len(samples) == 4 and all(s > 0 for s in samples), (rank, samples)

    model = mlflow.pyfunc.load_model(f"models:/{summary.model_name}/{summary.model_version}")
    recommender = model.unwrap_python_model().recommender
    ncf = recommender.model
    assert ncf.reads_history
    remembered = ncf.history.history
    assert len(remembered.movies) == sum(len(recommender.ratings_of(u)) for u in range(recommender.ids.n_users))

    user = int(np.argmax(recommender.ratings_per_user()))
    user_id = int(recommender.ids.user_ids[user])
    top = model.predict(pd.DataFrame({"user_id": [user_id]}), params={"k": 10})
    assert top["rank"].tolist() == list(range(1, 11))

    serve = load_config([f"serve.port={free_port()}", "serve.warm_users=10", "serve.min_replicas=1",
                         "serve.max_replicas=1"]).serve
    movie_ids = recommender.ids.movie_ids
    with running(serve, tracking_uri) as url, httpx.Client(base_url=url, timeout=60) as http:
        answer = http.get("/recommend", params={"user_id": user_id, "k": 10})
        assert answer.status_code == 200, answer.text
        assert [item["movie_id"] for item in answer.json()["items"]] == top["movie_id"].tolist()
        known = http.get("/explain", params={"user_id": user_id, "movie_id": int(top["movie_id"][0])}).json()
        rated = set(recommender.ids.movie_ids[recommender.ratings_of(user).movie].tolist())
        assert known["history_attention"] and {a["movie_id"] for a in known["history_attention"]} <= rated
        # Two visitors the model never saw, each rating five different movies: the model pools each one's ratings
        # into their user side, so it predicts them different ratings of the same movie.
        probe = int(movie_ids[0])
        predicted = []
        for liked in (movie_ids[1:6], movie_ids[6:11]):
            visitor = http.post("/users").json()["user_id"]
            ratings = [{"event_id": str(uuid.uuid4()), "user_id": visitor, "movie_id": int(m), "rating": 5.0}
                       for m in liked]
            stored = http.post("/ratings", json={"ratings": ratings})
            assert [r["status"] for r in stored.json()["results"]] == ["stored"] * 5, stored.text
            explained = http.get("/explain", params={"user_id": visitor, "movie_id": probe})
            assert explained.status_code == 200, explained.text
            predicted.append(explained.json()["predicted_rating"])
            # The ratings the model's history attention leaned on are the visitor's own, marked live.
            attended = explained.json()["history_attention"]
            assert attended and {a["movie_id"] for a in attended} <= {int(m) for m in liked}, attended
            assert {a["source"] for a in attended} == {"live"} and all(a["weight"] > 0 for a in attended)
        assert predicted[0] != pytest.approx(predicted[1], abs=1e-4), predicted
