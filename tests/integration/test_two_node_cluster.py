"""The multi-node path on loopback, end to end: PostgreSQL + moto's S3 server + the MLflow server
(platform/mlflow-server.sh, the `server` fixture), a two-node Ray cluster from platform/ray-cluster.sh
(NODES=2: a head that takes no training work and one worker node that joins it), and the train job submitted
as `make submit-train` does (`python -m jobs.submit jobs.train`) with a tiny config on the tiny dataset and
`train.storage_uri=s3://...`, and a job that fails, whose exit code `jobs.submit` hands back. Nothing relies
on the head's filesystem: runs go to the server, artifacts to
the bucket behind it, checkpoints to S3, and a training worker killed mid-run is replaced and resumes from
S3. Then Serve loads the champion through the server. Every process is stopped afterwards, also when a test
fails (the Ray nodes by their own temp dir)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from services import (
    AWS,
    BUCKET,
    PREFIX,
    ROOT,
    Server,
    client_env,
    free_ports,
    processes_of,
    tail,
    wait_for_job_api,
)

from ncf.config import Config, load_config
from ncf.integrations import mlflow_tracking
from ncf.ports import free_port
from ncf.training.checkpoints import load_checkpoint

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "platform" / "ray-cluster.sh"
CHECKPOINT_BUCKET, CHECKPOINT_PREFIX = "ncf-checkpoints", "checkpoints"
OBJECT_STORE = str(100 * 2**20)  # bytes per node: a tiny job needs little, and two nodes share this machine
EPOCHS = 8  # enough for a training worker to be killed mid-run, once a checkpoint is registered


@dataclass
class Cluster:
    address: str  # the job API
    temp_dir: str
    env: dict[str, str]  # what `ray` commands against it need

    def nodes(self) -> list[dict]:
        done = subprocess.run([str(Path(sys.executable).with_name("ray")), "list", "nodes", "--address", self.address,
                               "--format", "json"], env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)


def stop_processes(marker: str, grace: float = 5) -> list[int]:
    """SIGTERM to every process named by `marker`, SIGKILL to what is left after `grace` s; the survivors."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        for pid in processes_of(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (left := processes_of(marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
    return left


@contextlib.contextmanager
def two_node_cluster() -> Iterator[Cluster]:
    """`NODES=2 platform/ray-cluster.sh up` on free ports in a temp dir of its own (the worker node's is node-1
    inside it); stopped by that temp dir, never with `ray stop` (it would stop everyone's Ray)."""
    gcs, dashboard, client, agent = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="ncfray2-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # The nodes get no storage credentials or endpoint (the job brings its own), and no NCF_DATA_DIR: their
    # workers inherit the nodes' environment, where it would win over the job's data.dir (the tiny dataset).
    env = {k: v for k, v in client_env(NODES="2", RAY_DASHBOARD_PORT=str(dashboard), RAY_WORKER_CPUS="2",
                                       RAY_WORKER_ARGS=f"--object-store-memory {OBJECT_STORE}").items()
           if k not in ("RAY_ADDRESS", "NCF_DATA_DIR")}
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" not in env and (env.get("RAY_AUTH_TOKEN") or token.is_file() and token.stat().st_size):
        env["RAY_AUTH_MODE"] = "token"  # as the head decides by itself when a token exists
    address = f"http://127.0.0.1:{dashboard}"
    try:
        up = subprocess.run([str(SCRIPT), "up", "--port", str(gcs), "--ray-client-server-port", str(client),
                             "--dashboard-agent-listen-port", str(agent), "--temp-dir", temp_dir,
                             "--object-store-memory", OBJECT_STORE], env=env, capture_output=True, text=True,
                            timeout=180)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "worker node 1 of 1: 2 CPUs" in up.stdout
        wait_for_job_api(address, timeout=60)
        yield Cluster(address, temp_dir, env)
    finally:
        left = stop_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray cluster outlived it: {left}"


def train_workers(node_temp_dir: str) -> list[int]:
    """The Ray Train workers of one node: children of its raylet (named by the node's own temp dir), by
    their process title (other Ray clusters on this machine have workers of the same title)."""
    def read(pid: int | str, name: str) -> str:
        try:
            return Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def parent(pid: str) -> str:
        fields = read(pid, "stat").rsplit(")", 1)[-1].split()  # after "pid (comm)": state, ppid, ...
        return fields[1] if len(fields) > 1 else ""

    raylets = {str(pid) for pid in processes_of(node_temp_dir) if read(pid, "comm").strip() == "raylet"}
    return [int(proc.name) for proc in Path("/proc").iterdir() if proc.name.isdigit()
            and read(proc.name, "cmdline").startswith("ray::RayTrainWorker") and parent(proc.name) in raylets]


def checkpoint_registered(server: Server) -> bool:
    """Whether Ray Train registered a checkpoint: its controller's snapshot in S3 names a latest one (a
    checkpoint written but not registered yet would not be resumed from)."""
    for key in keys(server, CHECKPOINT_BUCKET, CHECKPOINT_PREFIX):
        if key.endswith("/checkpoint_manager_snapshot.json"):
            snapshot = json.loads(server.s3.get_object(Bucket=CHECKPOINT_BUCKET, Key=key)["Body"].read())
            if snapshot.get("latest_checkpoint_result"):
                return True
    return False


def kill_a_worker_once_a_checkpoint_is_registered(server: Server, node_temp_dir: str, killed: list,
                                                   stop: threading.Event) -> None:
    """Once a checkpoint is registered, SIGKILLs a training worker on the worker node."""
    try:
        while not stop.is_set():
            workers = train_workers(node_temp_dir) if checkpoint_registered(server) else []
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
                return
            time.sleep(0.2)
    except Exception as err:  # surfaced by the test, not lost in the thread
        killed.append(err)


@dataclass
class Job:
    run_id: str
    output: str
    nodes: list[dict]  # `ray list nodes` while the cluster ran
    killed: list  # the training worker killed mid-run
    failed: subprocess.CompletedProcess  # a job that fails (a tune job told to resume a sweep that never ran)


@pytest.fixture(scope="module")
def job(server: Server, tiny_config: Config, tiny_training_args: list[str]) -> Job:
    """The train job submitted to the two-node cluster (stopped once the job has ended); a training worker is
    killed once a checkpoint is registered in S3, and the run resumes from there."""
    server.s3.create_bucket(Bucket=CHECKPOINT_BUCKET)
    # The tiny dataset as tiny_config has it: its whole data section, JSON being YAML.
    data = [arg for key, value in tiny_config.data.model_dump(mode="json").items()
            for arg in ("--set", f"data.{key}={json.dumps(value)}")]
    sets = [*tiny_training_args, *data, "--set", "train.num_workers=2", "--set", "train.cpus_per_worker=1",
            "--set", f"train.max_epochs={EPOCHS}", "--set", f"train.patience={EPOCHS}",
            "--set", f"train.storage_uri=s3://{CHECKPOINT_BUCKET}/{CHECKPOINT_PREFIX}"]
    with two_node_cluster() as cluster:
        env = cluster.env | {"RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": server.url,
                             "MLFLOW_S3_ENDPOINT_URL": server.s3_endpoint, **AWS}
        env.pop("NCF_DATA_DIR", None)  # it would win over data.dir
        killed: list = []
        stop = threading.Event()
        killer = threading.Thread(target=kill_a_worker_once_a_checkpoint_is_registered,
                                  args=(server, f"{cluster.temp_dir}/node-1", killed, stop))
        killer.start()
        try:
            done = subprocess.run([sys.executable, "-m", "jobs.submit", "jobs.train", *sets], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=420)
        finally:
            stop.set()
            killer.join()
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{output[-6000:]}\nserver log:\n{tail(server.log)}"
        nodes = cluster.nodes()
        with tempfile.TemporaryDirectory(prefix="ncf-no-sweep-") as empty:
            failed = subprocess.run([sys.executable, "-m", "jobs.submit", "jobs.tune", "--resume", "--set",
                                     f"train.checkpoint_dir={empty}"], cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=300)
    found = re.search(r"MLflow run ([0-9a-f]{32}): model ncf-movielens version (\d+)", output)
    assert found, output[-3000:]
    return Job(found.group(1), output, nodes, killed, failed)


def client(server: Server) -> MlflowClient:
    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def keys(server: Server, bucket: str, prefix: str) -> set[str]:
    pages = server.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_run_artifacts_and_champion_are_on_the_server(server: Server, job: Job):
    assert "succeeded" in job.output and "epoch   1" in job.output  # the job's logs were followed
    mlflow = client(server)
    run = mlflow.get_run(job.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["launcher"] == "ray"
    assert run.data.params["train.storage_uri"] == f"s3://{CHECKPOINT_BUCKET}/{CHECKPOINT_PREFIX}"
    assert run.data.params["train.num_workers"] == "2" and "test_rmse" in run.data.metrics
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri

    champion = mlflow.get_model_version_by_alias(mlflow_tracking.MODEL_NAME, mlflow_tracking.CHAMPION)
    assert champion.run_id == job.run_id

    # The run's artifacts and the registered model's files are objects in the bucket behind the server.
    stored = keys(server, BUCKET, PREFIX)
    run_prefix = f"{PREFIX}/{run.info.artifact_uri.removeprefix('mlflow-artifacts:/').strip('/')}/"
    assert f"{run_prefix}config.yaml" in stored, sorted(stored)[:20]
    assert any(k.startswith(f"{run_prefix}plots/") for k in stored)
    assert any(k.endswith("/MLmodel") and not k.startswith(run_prefix) for k in stored), "the model's files"


def test_a_failed_job_hands_its_exit_code_back(job: Job):
    # Nothing to resume under an empty checkpoint folder: the tune job exits 2, and so does `make submit-tune`.
    assert job.failed.returncode == 2, job.failed.stdout[-4000:] + job.failed.stderr[-4000:]
    assert "no sweep to resume" in job.failed.stdout + job.failed.stderr


def test_checkpoints_are_in_s3_and_the_killed_worker_resumed_from_them(server: Server, job: Job, tmp_path: Path):
    assert job.killed and isinstance(job.killed[0], int), f"a training worker was killed mid-run: {job.killed}"
    stored = keys(server, CHECKPOINT_BUCKET, CHECKPOINT_PREFIX)
    written = re.compile(re.escape(f"{CHECKPOINT_PREFIX}/ncf-train-{job.run_id}/") + r"checkpoint_[^/]+/checkpoint\.pt")
    checkpoints = sorted(k for k in stored if written.fullmatch(k))
    assert checkpoints, sorted(stored)[:30]
    # The last checkpoint (named by time): the replacement workers continued the run from one in S3.
    server.s3.download_file(CHECKPOINT_BUCKET, checkpoints[-1], str(tmp_path / "checkpoint.pt"))
    server.s3.download_file(CHECKPOINT_BUCKET, f"{checkpoints[-1]}.sha256", str(tmp_path / "checkpoint.pt.sha256"))
    state = load_checkpoint(tmp_path)["state"]
    assert state["resumed"] >= 1, "the replacement worker group resumed from a checkpoint"
    assert [h["epoch"] for h in state["history"]] == list(range(1, EPOCHS + 1))
    assert "resuming at epoch" in job.output


def test_training_workers_ran_on_the_worker_node(server: Server, job: Job):
    head = [n for n in job.nodes if n["is_head_node"]]
    workers = [n for n in job.nodes if not n["is_head_node"]]
    assert len(head) == 1 and len(workers) == 1, job.nodes
    assert "CPU" not in head[0]["resources_total"]  # the head takes no training work
    tags = client(server).get_run(job.run_id).data.tags
    placed = {key: value for key, value in tags.items() if key.startswith("ray.worker.")}
    assert set(placed) == {f"ray.worker.{rank}.{what}" for rank in (0, 1) for what in ("node_id", "node_ip")}
    assert placed["ray.worker.0.node_id"] == placed["ray.worker.1.node_id"] == workers[0]["node_id"]
    assert placed["ray.worker.0.node_id"] != head[0]["node_id"]
    assert placed["ray.worker.0.node_ip"] == workers[0]["node_ip"]


def test_storage_secret_never_logged(server: Server, job: Job):
    secret = AWS["AWS_SECRET_ACCESS_KEY"]
    run = client(server).get_run(job.run_id)
    logged = [*run.data.params.items(), *run.data.tags.items()]
    assert not [key for key, value in logged if secret in key or secret in str(value)]
    assert secret not in job.output


def test_serve_loads_the_champion_through_the_server(server: Server, job: Job):
    """Last: the cluster is gone; Serve on a local Ray loads models:/ncf-movielens@champion from the server."""
    from serving.runtime import running  # Ray Serve: imported only by the tests that serve

    champion = client(server).get_model_version_by_alias(mlflow_tracking.MODEL_NAME, mlflow_tracking.CHAMPION)
    config = load_config([f"serve.port={free_port()}", "serve.warm_users=10", "serve.min_replicas=1",
                          "serve.max_replicas=1"]).serve
    with running(config, server.url) as url, httpx.Client(base_url=url, timeout=60) as http:
        version = http.get("/version").json()
        assert (version["model_version"], version["run_id"]) == (str(champion.version), job.run_id)
        top = http.get("/recommend", params={"user_id": 1, "k": 5}).json()
        assert len(top["items"]) == 5 and top["model_version"] == str(champion.version), top
