"""The tracking server of platform/mlflow-server.sh, for real: MLflow on a PostgreSQL backend store it creates,
artifacts proxied to an S3-compatible store (moto's S3 server), the train job logging to it over HTTP with no
storage credentials, and a clean stop on SIGTERM. Everything listens on 127.0.0.1, on free ports. The server
(the `server` fixture) and its helpers are shared with other modules: tests/integration/services.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from mlflow import MlflowClient
from services import (
    AWS,
    BUCKET,
    PREFIX,
    Server,
    client_env,
    pid_alive,
    postmaster_running,
    session_members,
    tail,
    wait_closed,
)

from ncf.integrations import mlflow_tracking

pytestmark = pytest.mark.integration


@dataclass
class Trained:
    run_id: str
    work: Path
    stdout: str


@pytest.fixture(scope="module")
def trained(server: Server, data_dir: Path, tmp_path_factory: pytest.TempPathFactory,
            tiny_training_args: list[str]) -> Trained:
    """The real train job (in-process launcher, a tiny model) run against the server from an empty directory."""
    work = tmp_path_factory.mktemp("work")
    done = subprocess.run([sys.executable, "-m", "jobs.train", "--launcher", "local", *tiny_training_args], cwd=work,
                          env=client_env(MLFLOW_TRACKING_URI=server.url, NCF_DATA_DIR=str(data_dir)),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stderr[-4000:]}\nserver log:\n{tail(server.log)}"
    found = re.search(r"MLflow run ([0-9a-f]{32}): model ncf-movielens version (\d+)", done.stdout)
    assert found, done.stdout[-2000:]
    return Trained(found.group(1), work, done.stdout)


def client(server: Server) -> MlflowClient:
    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def logged_model_id(version) -> str:
    """The logged model behind a registered version (its source is `models:/<model id>`; the SQL registry
    store does not keep `model_id` itself)."""
    assert version.model_id or version.source.startswith("models:/"), version.source
    return version.model_id or version.source.removeprefix("models:/").split("/")[0]


LOAD = """
import json, mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/ncf-movielens@champion")
top = model.predict(pd.DataFrame({"user_id": [1]}), params={"k": 5})
print(json.dumps(top.to_dict("list")))
"""


def test_train_job_logs_and_registers_through_the_server(server: Server, trained: Trained, tmp_path: Path):
    mlflow = client(server)
    run = mlflow.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    for name in ("test_rmse", "test_mae", "test_precision_at_10", "test_ndcg_at_10", "test_full_ndcg_at_10",
                 "baselines/user_item_bias/test_rmse"):
        assert name in run.data.metrics, name
    assert 0.7 < run.data.metrics["test_rmse"] < 1.3
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.name == mlflow_tracking.EXPERIMENT
    assert experiment.artifact_location.startswith("mlflow-artifacts:/"), experiment.artifact_location
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri

    champion = mlflow.get_model_version_by_alias(mlflow_tracking.MODEL_NAME, mlflow_tracking.CHAMPION)
    assert str(champion.version) == "1" and champion.run_id == trained.run_id

    # The artifacts are objects in the bucket: the run's own (config, plots) and the registered model's files.
    keys = {o["Key"] for page in server.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX)
            for o in page.get("Contents", [])}
    run_prefix = f"{PREFIX}/{run.info.artifact_uri.removeprefix('mlflow-artifacts:/').strip('/')}/"
    assert f"{run_prefix}config.yaml" in keys, sorted(keys)[:20]
    assert f"{run_prefix}plots/learning_curves.png" in keys
    model_location = mlflow.get_logged_model(logged_model_id(champion)).artifact_location
    assert model_location.startswith("mlflow-artifacts:/"), model_location
    model_prefix = f"{PREFIX}/{model_location.removeprefix('mlflow-artifacts:/').strip('/')}/"
    model_keys = {k for k in keys if k.startswith(model_prefix)}
    assert f"{model_prefix}MLmodel" in model_keys and f"{model_prefix}python_model.pkl" in model_keys
    assert any(k.startswith(f"{model_prefix}artifacts/") and k.endswith("/weights.pt") for k in model_keys), sorted(
        model_keys)

    # The job wrote its report where it ran, and nothing of the store.
    assert (trained.work / "reports" / "metrics.json").is_file()
    assert not (trained.work / "mlruns").exists() or not any((trained.work / "mlruns").iterdir())

    # The champion loads back through the server's artifact proxy, in a process without storage credentials.
    done = subprocess.run([sys.executable, "-c", LOAD], cwd=tmp_path, env=client_env(MLFLOW_TRACKING_URI=server.url),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    top = json.loads(done.stdout.strip().splitlines()[-1])
    assert top["rank"] == [1, 2, 3, 4, 5] and set(top["user_id"]) == {1}
    assert all(isinstance(title, str) and title for title in top["title"])
    assert all(0.5 <= r <= 5.0 for r in top["predicted_rating"])


def test_backend_store_is_postgresql(server: Server, trained: Trained):
    password = (server.pg_dir / "password").read_text().strip()
    with psycopg.connect(host="127.0.0.1", port=server.pg_port, dbname="mlflow", user="mlflow", password=password,
                         connect_timeout=10) as db:
        assert db.execute("SELECT version()").fetchone()[0].startswith("PostgreSQL")
        tables = {row[0] for row in db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
        assert {"alembic_version", "experiments", "runs", "metrics", "params", "registered_models",
                "model_versions"} <= tables
        assert db.execute("SELECT status FROM runs WHERE run_uuid = %s", (trained.run_id,)).fetchone() == ("FINISHED",)
        assert db.execute("SELECT version FROM model_versions WHERE name = %s",
                          (mlflow_tracking.MODEL_NAME,)).fetchall() == [(1,)]
    # TCP connections need the password (only the unix socket, in a folder of the owner's, is trusted).
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=server.pg_port, dbname="mlflow", user="mlflow", password="wrong",
                        connect_timeout=10)


def test_storage_secret_never_logged(server: Server, trained: Trained):
    secret = AWS["AWS_SECRET_ACCESS_KEY"]
    mlflow = client(server)
    run = mlflow.get_run(trained.run_id)
    logged = [*run.data.params.items(), *run.data.tags.items()]
    version = mlflow.get_model_version(mlflow_tracking.MODEL_NAME, "1")
    model = mlflow.get_logged_model(logged_model_id(version))
    logged += [*model.params.items(), *model.tags.items(), *version.tags.items()]
    assert not [key for key, value in logged if secret in key or secret in str(value)]
    assert secret not in trained.stdout
    assert secret not in server.log.read_text(errors="replace")  # nor does the server print it


def test_allowed_hosts(server: Server):
    """MLflow's security middleware: a listed service name is served, loopback still is, anything else is 403."""
    def status(host: str) -> int:
        request = urllib.request.Request(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as err:
            return err.code

    assert status(f"mlflow-tracking:{server.port}") == 200
    assert status(f"127.0.0.1:{server.port}") == 200 and status(f"localhost:{server.port}") == 200
    assert status(f"mlflow-elsewhere:{server.port}") == 403


def test_sigterm_stops_the_server_and_postgresql(server: Server):
    """Last in the module: a SIGTERM to the script alone stops the server and PostgreSQL, and it exits 0."""
    assert server.stop() == 0, tail(server.log)
    assert not wait_closed(server.port, server.pg_port), "ports still open after the script exited"
    assert not postmaster_running(server.pg_dir / "data"), "PostgreSQL's postmaster is still running"
    assert not pid_alive(server.postmaster_pid)
    assert not (server.pg_dir / "data" / "postmaster.pid").exists()
    assert not [pid for pid in session_members(server.script.pid) if pid_alive(pid)], "processes left behind"
