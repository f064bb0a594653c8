"""The tracking server of platform/mlflow-server.sh, for real: MLflow on a PostgreSQL backend store it creates,
artifacts proxied to an S3-compatible store (moto's S3 server), the train job logging to it over HTTP with no
storage credentials, and a clean stop on SIGTERM. Everything listens on 127.0.0.1, on free ports."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import psycopg
import pytest
from mlflow import MlflowClient

from ncf.integrations import mlflow_tracking
from ncf.integrations.ray_train import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]  # the repository
SCRIPT = ROOT / "platform" / "mlflow-server.sh"
BUCKET = "ncf-mlflow"
PREFIX = "mlflow"  # the artifacts destination is s3://BUCKET/PREFIX
ALLOWED_HOST = "mlflow-tracking:*"  # an in-cluster service name, as MLFLOW_ALLOWED_HOSTS lists it
# Only the server gets these: the secret is random, so finding it anywhere else means it leaked.
AWS = {"AWS_ACCESS_KEY_ID": "ncf-test-key-id", "AWS_SECRET_ACCESS_KEY": f"ncf-secret-{secrets.token_hex(16)}",
       "AWS_DEFAULT_REGION": "us-east-1"}


def postgres_bin() -> Path | None:
    """PostgreSQL's bin folder as the script finds it (MLFLOW_PG_BIN, initdb on PATH, /usr/lib/postgresql)."""
    if os.environ.get("MLFLOW_PG_BIN"):
        return Path(os.environ["MLFLOW_PG_BIN"])
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def client_env(**extra: str) -> dict[str, str]:
    """A client's environment: no storage credentials or endpoint (only the server has them), no other store."""
    drop = ("AWS_", "MLFLOW_S3_", "MLFLOW_TRACKING_", "MLFLOW_REGISTRY_", "MLFLOW_BACKEND_", "MLFLOW_ARTIFACTS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k != "NCF_CONF_DIR"}
    return env | {"RAY_USAGE_STATS_ENABLED": "0"} | extra


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_closed(*ports: int, timeout: float = 30) -> list[int]:
    """The ports still open after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (still := [p for p in ports if port_open(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return still


def pid_alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not: a daemon's exit is reaped by init, maybe not at once)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def postmaster_running(data: Path) -> int | None:
    """The pid of a postmaster running on the data folder `data`, if any."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(data).encode() in cmdline else None


def stop_postgres(data: Path) -> None:
    """The last resort: PostgreSQL stopped at once, as the user it runs as."""
    stop = [str(postgres_bin() / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
    if os.geteuid() == 0:
        stop = ["runuser", "-u", "postgres", "--", *stop]
    subprocess.run(stop, capture_output=True, timeout=60)


def session_members(sid: int) -> list[int]:
    """The processes of session `sid` (one this test started with start_new_session=True)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
            members.append(int(stat.parent.name))
    return members


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@dataclass
class Server:
    url: str
    port: int
    script: subprocess.Popen
    log: Path
    pg_dir: Path
    pg_port: int
    postmaster_pid: int
    s3: object  # a boto3 S3 client for moto (the test's own credentials, not the clients')
    exit_code: int | None = field(default=None)

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM to the script alone (as `kill` or Ctrl-C would), then its exit code; idempotent.

        Whatever the script leaves behind after `timeout` seconds is killed here (its session, its PostgreSQL)
        and the stop is reported as failed (-1)."""
        if self.exit_code is not None:
            return self.exit_code
        if self.script.poll() is None:
            self.script.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.script.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.exit_code = -1
        for pid in session_members(self.script.pid):  # the script and the server it started, if any is left
            if pid_alive(pid):
                self.exit_code = -1
                kill(pid)
        self.script.wait(timeout=30)
        if postmaster_running(self.pg_dir / "data"):
            self.exit_code = -1
            stop_postgres(self.pg_dir / "data")
        return self.exit_code


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """moto's S3 server with a bucket, then platform/mlflow-server.sh on a fresh PostgreSQL folder with its
    artifacts in that bucket; every process is stopped afterwards, also when a test failed."""
    pg_bin = postgres_bin()
    if pg_bin is None or not (pg_bin / "pg_ctl").exists():
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root needs a `postgres` system user to run PostgreSQL")

    # Not under pytest's temporary folder (mode 0700): as root, the `postgres` user must reach the data folder.
    # A short path too: the unix socket lives in it.
    tmp = Path(tempfile.mkdtemp(prefix="ncf-mlflow-server-"))
    tmp.chmod(0o755)
    s3_port, port, pg_port = free_port(), free_port(), free_port()
    while len({s3_port, port, pg_port}) < 3:
        pg_port = free_port()
    moto_log, log = tmp / "moto.log", tmp / "mlflow-server.log"
    moto = script = srv = None
    try:
        with moto_log.open("wb") as out:
            moto = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                     "-p", str(s3_port)], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 60
        while not port_open(s3_port):
            assert moto.poll() is None and time.monotonic() < deadline, f"moto did not start:\n{tail(moto_log)}"
            time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{s3_port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"], region_name=AWS["AWS_DEFAULT_REGION"])
        s3.create_bucket(Bucket=BUCKET)

        env = client_env(MLFLOW_PORT=str(port), MLFLOW_PG_PORT=str(pg_port), MLFLOW_PG_DIR=str(tmp / "pg"),
                         MLFLOW_ARTIFACTS_DESTINATION=f"s3://{BUCKET}/{PREFIX}", MLFLOW_S3_ENDPOINT_URL=endpoint,
                         MLFLOW_ALLOWED_HOSTS=ALLOWED_HOST, **AWS)
        with log.open("wb") as out:
            script = subprocess.Popen([str(SCRIPT)], cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert script.poll() is None, f"mlflow-server.sh exited with {script.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"no /health answer in 180 s:\n{tail(log)}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        postmaster_pid = int((tmp / "pg" / "data" / "postmaster.pid").read_text().split()[0])
        srv = Server(url, port, script, log, tmp / "pg", pg_port, postmaster_pid, s3)
        yield srv
    finally:
        failures = []
        if srv is not None:
            if srv.stop() != 0:
                failures.append(f"mlflow-server.sh did not stop cleanly ({srv.exit_code}):\n{tail(log)}")
        elif script is not None:  # it never became healthy: stop what it started all the same
            if script.poll() is None:
                script.send_signal(signal.SIGTERM)
                try:
                    script.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    os.killpg(script.pid, signal.SIGKILL)
                    script.wait(timeout=30)
            for pid in session_members(script.pid):
                kill(pid)
            if postmaster_running(tmp / "pg" / "data"):
                stop_postgres(tmp / "pg" / "data")
        if moto is not None:
            os.killpg(moto.pid, signal.SIGTERM)
            try:
                moto.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(moto.pid, signal.SIGKILL)
                moto.wait(timeout=30)
        if still := wait_closed(s3_port, port, pg_port):
            failures.append(f"ports still open after the stop: {still}")
        if postmaster_running(tmp / "pg" / "data") or (tmp / "pg" / "data" / "postmaster.pid").exists():
            failures.append("PostgreSQL is still running (or did not shut down cleanly) after the stop")
        shutil.rmtree(tmp, ignore_errors=True)
        assert not failures, "\n".join(failures)


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
