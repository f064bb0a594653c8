"""Jobs on a Ray cluster the way users submit them: a real Ray head of this test's own
(non-default ports, its own temp dir, started by `platform/ray-cluster.sh up`, the script
behind `make cluster-up`) and `python -m jobs.submit`, the module behind
`make submit-train` / `make submit-tune`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from services import free_ports, processes_of, wait_for_job_api

from ncf.integrations import mlflow_tracking

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]  # the repository
SCRIPT = ROOT / "platform" / "ray-cluster.sh"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, data_dir):
    """A Ray head on free loopback ports, stopped (its processes only) when the module ends."""
    gcs, dashboard, client, agent = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="ncfray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    store = tmp_path_factory.mktemp("mlflow")
    env = dict(os.environ, RAY_DASHBOARD_PORT=str(dashboard), RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}", NCF_DATA_DIR=str(data_dir))
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - open for the head's lifetime
    head = subprocess.Popen([str(SCRIPT), "up", "--block", "--port", str(gcs), "--ray-client-server-port", str(client),
                             "--dashboard-agent-listen-port", str(agent), "--temp-dir", temp_dir, "--num-cpus", "2"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        def head_alive() -> None:
            assert head.poll() is None, Path(temp_dir, "head.log").read_text()

        wait_for_job_api(address, timeout=120, alive=head_alive)
        yield env | {"RAY_ADDRESS": address}
    finally:
        head.terminate()  # `ray start --block` stops every process it started on SIGTERM ...
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # ... after draining for up to 30 s: not worth waiting for
            head.kill()
            for pid in processes_of(temp_dir):  # the head's own processes, named by its temp dir
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (leftovers := processes_of(temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, f"processes of the test's Ray head outlived it: {leftovers}"


def submit(env: dict, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.submit", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_submitted_train_job_succeeds_and_lands_in_mlflow(ray_head, tmp_path, tiny_training_args):
    sets = [*tiny_training_args, "--set", f"train.checkpoint_dir={tmp_path}"]
    job = submit(ray_head, "jobs.train", *sets)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "epoch   1" in job.stdout  # the job's logs are followed
    uri = ray_head["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a registry another test set globally
    [experiment] = [e for e in client.search_experiments() if e.name == mlflow_tracking.EXPERIMENT]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["launcher"] == "ray"
    assert run.data.params["model.embedding_dim"] == "16" and "test_rmse" in run.data.metrics
    assert client.get_model_version(mlflow_tracking.MODEL_NAME, "1").run_id == run.info.run_id


def test_job_exit_code_is_handed_back(ray_head, tmp_path):
    # Nothing to resume under an empty checkpoint folder: the tune job exits 2.
    job = submit(ray_head, "jobs.tune", "--resume", "--set", f"train.checkpoint_dir={tmp_path}")
    assert job.returncode == 2, job.stdout[-4000:] + job.stderr[-4000:]
    assert "no sweep to resume" in job.stdout + job.stderr
