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


def test_request_bodies_are_bounded(config: Config):
    """A byte limit that a /predict body at the pair limit fits in (so it is the pair limit that answers it, with
    a 422), and no larger than a few MiB."""
    largest = json.dumps({"pairs": [{"user_id": MAX_ID, "movie_id": MAX_ID}] * MAX_PAIRS}).encode()
    assert len(largest) <= config.serve.max_body_bytes <= 16 * 2**20
    assert MAX_PAIRS <= 100_000
