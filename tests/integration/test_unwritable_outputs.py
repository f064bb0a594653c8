"""The real train and tune jobs with a reports folder they cannot write: they stop before any training with
exit code 2 and an error naming the folder, and leave nothing behind. Read-only is a root-owned folder and the
job run as an unprivileged user (root writes through any mode bits); the other case, a file where the
folder should be. (A full disk is tested on the writers themselves: tests/unit/test_write_faults.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "ml-tiny"
NOBODY = 65534
TRAIN = [sys.executable, "-m", "jobs.train", "--launcher", "local", "--set", f"data.dir={TINY}",
         "--set", "train.max_epochs=1", "--preset", "tiny"]


@pytest.fixture
def workdir():
    """A working directory everybody can reach (pytest's tmp_path is private to root), with a folder that
    everybody may write for what the job is allowed to write (its MLflow store)."""
    folder = Path(tempfile.mkdtemp(prefix="ncf-unwritable-"))
    folder.chmod(0o755)
    (folder / "open").mkdir()
    (folder / "open").chmod(0o777)
    yield folder
    shutil.rmtree(folder)


def job_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "NCF_", "RAY_ADDRESS"))}
    return env | {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'open' / 'mlflow.db'}", "HOME": str(workdir / "open"),
                  "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}


def test_train_job_as_a_user_who_cannot_write_the_reports_folder(workdir: Path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the job as an unprivileged user")
    (workdir / "reports").mkdir(mode=0o755)  # root's: read-only to the job
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *TRAIN],
                          cwd=workdir, env=job_env(workdir), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"error: the report folder {workdir / 'reports'} is not writable: [Errno 13] Permission denied" \
        in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "epoch" not in done.stdout  # stopped before training
    assert list((workdir / "reports").iterdir()) == []
    assert not (workdir / "open" / "mlflow.db").exists(), "stopped before any MLflow run"


def test_tune_job_refuses_an_unwritable_report_path_before_the_sweep(workdir: Path):
    (workdir / "reports").write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "jobs.tune", "--report", "reports/tune.md", "--set",
                           f"data.dir={TINY}"], cwd=workdir, env=job_env(workdir), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"cannot create the report folder {workdir / 'reports'}: [Errno 17] File exists" in done.stderr
    assert not (workdir / "open" / "mlflow.db").exists(), "stopped before the sweep started"
