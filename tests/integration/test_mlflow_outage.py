"""The MLflow store unreachable for a while during training: the real train job (in-process launcher, a tiny model)
logs to a real tracking server (`mlflow server`, SQLite store, on loopback) that is stopped after the second epoch
and started again on the same port and store a few epochs later. The run still finishes and no epoch's metrics are
lost: the epochs logged meanwhile are buffered and sent once the server answers again (EpochLogger)."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ncf.ports import free_port

pytestmark = pytest.mark.integration

EPOCHS = 8
STOP_AFTER, START_AFTER = 2, 5  # the server is stopped once epoch 2 ended, started again once epoch 5 did
EPOCH_LINE = re.compile(r"^epoch\s+(\d+)\s")
UNREACHABLE = "MLflow store unreachable"  # EpochLogger's warning when a send fails
# MLflow's client retries each request itself, by default for minutes (7 tries, backoff factor 2) before a send
# fails; shorter here, so that the outage reaches EpochLogger's own buffer and retries within a short test.
CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@dataclass
class TrackingServer:
    """`mlflow server` on 127.0.0.1:`port` with its store in `folder`; stop() and start() keep both."""

    folder: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        log = (self.folder / "server.log").open("ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"mlflow server exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"no /health answer in {timeout} s:\n{self.log()}"
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGKILL to the server's process group (its own session): the store goes away at once, as in a crash
        (a graceful stop takes the server ~18 s); waits for the port to close."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{self.url}/health", timeout=2)

    def log(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")[-4000:]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TrackingServer]:
    server = TrackingServer(tmp_path / "store", free_port())
    server.folder.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def read_lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_training_survives_an_unreachable_store_and_loses_no_metric(server: TrackingServer, data_dir: Path,
                                                                   tmp_path: Path, tiny_training_args: list[str]):
    work = tmp_path / "work"
    work.mkdir()
    args = [*tiny_training_args, "--set", f"train.max_epochs={EPOCHS}", "--set", "train.patience=100"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))} | CLIENT_RETRIES | {
        "MLFLOW_TRACKING_URI": server.url, "NCF_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1",
        "RAY_USAGE_STATS_ENABLED": "0"}
    # stderr into stdout: the logger's warning and the epoch lines in the order they were written.
    job = subprocess.Popen([sys.executable, "-m", "jobs.train", "--launcher", "local", *args], cwd=work, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=read_lines, args=(job.stdout, lines), daemon=True).start()

    output: list[str] = []
    stopped = restarted = None  # wall-clock seconds, as the metrics' timestamps
    try:
        deadline = time.monotonic() + 600
        while (line := lines.get(timeout=600)) is not None:
            assert time.monotonic() < deadline, "".join(output)[-6000:]
            output.append(line)
            epoch = int(match.group(1)) if (match := EPOCH_LINE.match(line)) else None
            if epoch == STOP_AFTER:
                # From the moment the stop begins: a fast machine may train several epochs while it takes.
                stopped = time.time()
                server.stop()  # the job trains on meanwhile
            elif stopped and not restarted and epoch in (START_AFTER, EPOCHS):
                server.start()
                restarted = time.time()
        assert job.wait(timeout=60) == 0, "".join(output)[-6000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=30)
        job.stdout.close()
    text = "".join(output)
    assert stopped and restarted, text[-6000:]
    assert UNREACHABLE in text, f"the job never found the server gone:\n{text[-6000:]}"

    found = re.search(r"MLflow run ([0-9a-f]{32}): model \S+ version (\d+)", text)
    assert found, text[-4000:]
    client = MlflowClient(server.url)
    run = client.get_run(found.group(1))
    assert run.info.status == "FINISHED"
    assert "test_rmse" in run.data.metrics
    trained = sorted({int(m.group(1)) for line in output if (m := EPOCH_LINE.match(line))})
    assert trained == list(range(1, EPOCHS + 1))
    for key in ("train_loss", "val_rmse", "lr", "epoch_seconds"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == trained, key
    # The epochs logged while the server was down: buffered, then sent once it was back.
    meanwhile = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")
                       if stopped * 1000 <= m.timestamp < restarted * 1000)
    print(f"\nstore down for {restarted - stopped:.1f} s; epochs logged meanwhile and kept: {meanwhile}")
    assert len(meanwhile) >= 2
