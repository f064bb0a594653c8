"""The services the integration tests start and stop themselves, shared by their modules: the tracking
server of platform/mlflow-server.sh (PostgreSQL, moto's S3 server, MLflow; the `server` fixture of
conftest.py), a bare PostgreSQL (the live ratings store's tests) and the processes of a Ray cluster found by its
own temp dir. Everything listens on 127.0.0.1, on free ports; every stop is checked."""

from __future__ import annotations

import contextlib
import os
import pwd
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
import psutil
import pytest
import ray

from ncf.ports import free_port

ROOT = Path(__file__).resolve().parents[2]  # the repository
MLFLOW_SCRIPT = ROOT / "platform" / "mlflow-server.sh"
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


def wait_for_job_api(address: str, timeout: float, alive=lambda: None) -> None:
    """Until the Ray head at `address` answers on its job API; `alive()` asserts the head still runs."""
    deadline = time.monotonic() + timeout
    while True:
        alive()
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # answering (auth may be required): up
        except OSError:
            assert time.monotonic() < deadline, "the Ray head's job API did not come up"
            time.sleep(0.5)


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


def as_postgres_user(command: list[str]) -> list[str]:
    """`command` run as the user PostgreSQL runs as: `postgres` for root (initdb and postgres refuse root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def skip_without_postgres() -> Path:
    """PostgreSQL's bin folder; skips the test when its server programs or (as root) its user are missing."""
    pg_bin = postgres_bin()
    if pg_bin is None or not (pg_bin / "pg_ctl").exists():
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root needs a `postgres` system user to run PostgreSQL")
    return pg_bin


def stop_postgres(data: Path) -> None:
    """The last resort: PostgreSQL stopped at once, as the user it runs as."""
    stop = [str(postgres_bin() / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
    subprocess.run(as_postgres_user(stop), capture_output=True, timeout=60)


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
    s3_endpoint: str  # moto's URL
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


@contextlib.contextmanager
def mlflow_server() -> Iterator[Server]:
    """moto's S3 server with a bucket, then platform/mlflow-server.sh on a fresh PostgreSQL folder with its
    artifacts in that bucket; every process is stopped afterwards, also when the code using it failed
    (skips the test when PostgreSQL is not installed)."""
    skip_without_postgres()
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
            script = subprocess.Popen([str(MLFLOW_SCRIPT)], cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
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
        srv = Server(url, port, script, log, tmp / "pg", pg_port, postmaster_pid, s3, endpoint)
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
class Postgres:
    """A bare PostgreSQL cluster on 127.0.0.1:`port`, role `ncf` trusted (a test's own server, nothing else
    reaches it), with the database `ncf`; `stop` and `start` it to take it away and bring it back."""

    bin: Path
    dir: Path
    port: int
    role: str = "ncf"

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def uri(self, database: str = "ncf") -> str:
        return f"postgresql+psycopg://{self.role}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir / 'run'}"
        start = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "postgres.log"), "-w",
                 "-t", "120", "-o", options, "start"]
        done = subprocess.run(as_postgres_user(start), capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"PostgreSQL did not start:\n{done.stderr}\n{tail(self.dir / 'postgres.log')}"

    def stop(self) -> None:
        stop = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"]
        done = subprocess.run(as_postgres_user(stop), capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, f"PostgreSQL did not stop:\n{done.stderr}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URI."""
        create = [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.role, name]
        done = subprocess.run(create, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"createdb {name} failed:\n{done.stderr}"
        return self.uri(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster in a temporary folder on a free port, running; stopped and removed afterwards,
    also when the code using it failed (skips the test when PostgreSQL is not installed)."""
    pg_bin = skip_without_postgres()
    tmp = Path(tempfile.mkdtemp(prefix="ncf-postgres-"))  # short, and reachable by the `postgres` user
    tmp.chmod(0o755)
    server = Postgres(pg_bin, tmp, free_port())
    try:
        (tmp / "run").mkdir()
        server.data.mkdir(mode=0o700)
        (tmp / "postgres.log").touch()
        if os.geteuid() == 0:
            for path in (server.data, tmp / "run", tmp / "postgres.log"):
                shutil.chown(path, "postgres")
        initdb = [str(pg_bin / "initdb"), "-D", str(server.data), "-U", server.role, "--auth=trust", "-E", "UTF8",
                  "--no-locale"]
        done = subprocess.run(as_postgres_user(initdb), capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"initdb failed:\n{done.stdout}\n{done.stderr}"
        server.start()
        server.create_database("ncf")
        yield server
    finally:
        running = postmaster_running(server.data)
        if running:
            server.stop()
        if postmaster_running(server.data):
            stop_postgres(server.data)
        still = wait_closed(server.port)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not still, f"PostgreSQL still listens on {server.port} after the stop"


# ----------------------------------------------------------------------------- Ray nodes


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports nobody listens on now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def processes_of(marker: str) -> list[int]:
    """PIDs whose command line names `marker` (a Ray cluster's own temp dir), this process aside."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in proc.joinpath("cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@contextlib.contextmanager
def serve_process(port: int, env: dict[str, str], *overrides: str) -> Iterator[subprocess.Popen]:
    """`make serve` (`python -m serving`) on 127.0.0.1:`port` with `--set` `overrides`, in a process of its own with
    `env`; yields it once its banner says it answers, then stops it with SIGTERM (everything it started included,
    also after a failed check)."""
    args = [sys.executable, "-m", "serving", "--set", f"serve.port={port}"]
    for override in overrides:
        args += ["--set", override]
    process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: list[psutil.Process] = []
    try:
        output = []
        for line in process.stdout:  # the banner comes once the app answers
            output.append(line)
            if line.startswith("serving "):
                break
        assert output and f"http://127.0.0.1:{port}" in output[-1], "".join(output[-40:])
        started = psutil.Process(process.pid).children(recursive=True)
        yield process
        started = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"left running: {[p.name() for p in alive]}"
    finally:
        if process.poll() is None:
            with contextlib.suppress(psutil.Error):
                started = psutil.Process(process.pid).children(recursive=True)
            process.kill()
            process.wait(timeout=30)
        for child in started:
            with contextlib.suppress(psutil.Error):
                child.kill()
        process.stdout.close()


def _raylet_workers() -> list[psutil.Process]:
    """Every process under the raylet this driver started: its workers and agents."""
    workers = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker may exit while we look
            if child.name() == "raylet":
                workers += child.children(recursive=True)
    return workers


@contextlib.contextmanager
def private_ray() -> Iterator[None]:
    """A private 2-CPU Ray cluster in this driver, with the dashboard (its state API finds actors).

    Stopped with every process it started, also when the block fails: a Ray worker can hang at exit after its
    work is done (seen with Ray Train's controller actor) and outlive `ray.shutdown()`, so the raylet's workers
    still alive 10 s after it are killed (these PIDs only)."""
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        yield
    finally:
        workers = _raylet_workers()
        ray.shutdown()
        _, alive = psutil.wait_procs(workers, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
