"""Retrievers added through the registry alone: `make train ARGS="--set retrieval.retriever=itemknn"` (or
`history`, the neural history model) trains, registers and serves it (the pyfunc, /recommend and /explain over
HTTP), and it has its own baseline row."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from jobs import train as train_job
from ncf.config import Config, load_config
from ncf.integrations import mlflow_tracking
from ncf.ports import free_port
from serving.runtime import running

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("retriever", ["itemknn", "history"])
def test_an_added_retriever_trains_registers_and_serves(retriever: str, tiny_config: Config,
                                                        tiny_training_args: list[str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.chdir(tmp_path)  # reports/metrics.json lands here
    monkeypatch.delenv("NCF_DATA_DIR", raising=False)  # it would win over data.dir
    data = tiny_config.data
    args = ["--launcher", "local", *tiny_training_args, "--set", f"retrieval.retriever={retriever}",
            "--set", f"data.dir={data.dir}", "--set", f"data.prepared_dir={data.prepared_dir}",
            "--set", f"data.datasets.ml-latest-small.sha256={json.dumps(data.published.sha256)}",
            "--set", f"train.checkpoint_dir={tmp_path / 'checkpoints'}"]
    assert train_job.main(args) == 0

    report = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert 0 < report["models"][retriever]["full_ndcg_at_10"] <= 1  # its own row of the metric table

    version = MlflowClient().get_model_version_by_alias(mlflow_tracking.MODEL_NAME, mlflow_tracking.CHAMPION)
    model = mlflow.pyfunc.load_model(f"models:/{mlflow_tracking.MODEL_NAME}@{mlflow_tracking.CHAMPION}")
    recommender = model.unwrap_python_model().recommender
    assert recommender.candidates.name == retriever
    user = int(np.argmax(recommender.ratings_per_user()))
    user_id = int(recommender.ids.user_ids[user])
    top = model.predict(pd.DataFrame({"user_id": [user_id]}), params={"k": 10})
    assert top["rank"].tolist() == list(range(1, 11))
    assert not set(top["movie_id"]) & set(recommender.ids.movie_ids[recommender.ratings_of(user).movie].tolist())

    # Served over HTTP by `make serve`'s runtime: /recommend answers the pyfunc's list, /explain the retriever's
    # evidence for a movie.
    retrieved = recommender.candidates.score(np.array([user]))[0]
    best = int(top["movie_id"][np.argmax(retrieved[recommender.movie_indices(top["movie_id"])])])
    serve = load_config([f"serve.port={free_port()}", "serve.warm_users=10", "serve.min_replicas=1",
                         "serve.max_replicas=1"]).serve
    with running(serve, tracking_uri) as url, httpx.Client(base_url=url, timeout=60) as http:
        answer = http.get("/recommend", params={"user_id": user_id, "k": 10})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == str(version.version)
        assert [item["movie_id"] for item in answer.json()["items"]] == top["movie_id"].tolist()
        explained = http.get("/explain", params={"user_id": user_id, "movie_id": best})
        assert explained.status_code == 200, explained.text
        assert explained.json()["retriever"] == retriever and explained.json()["retrieved_because_you_rated"]
