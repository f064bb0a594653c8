"""Run a job module on a Ray cluster through `ray job submit` (`make submit-train`, `make submit-tune`).

    python -m jobs.submit jobs.train [args ...]

Run from the repository root: its code and config travel as the job's `working_dir`
(no virtualenv, stores, checkpoints, reports, docs or tests). The job's logs are
followed and its own exit code is returned. `RAY_ADDRESS` names the cluster's job API
(default: the local head `make cluster-up` starts, http://127.0.0.1:$RAY_DASHBOARD_PORT).
The job records its runs at `MLFLOW_TRACKING_URI` (default: this directory's SQLite
store, which only a cluster on this machine can reach: remote clusters need an MLflow
server both sides reach). The S3 settings set here travel with the job too (FORWARDED:
the endpoint, region and credentials `train.storage_uri=s3://...` needs), in a runtime-env
file readable only by this user, never on a command line or in the output.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from ncf.integrations.mlflow_tracking import tracking_uri

EXCLUDES = [".git", ".venv", "mlruns", "checkpoints", "reports", "docs", "tests", "data", "**/__pycache__",
            "*.egg-info", ".pytest_cache", ".ruff_cache"]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "auto")
# Passed on to the job when set here: where S3 is and the credentials to reach it (train.storage_uri).
FORWARDED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
             "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")


def cluster_address() -> str:
    return os.environ.get("RAY_ADDRESS") or f"http://127.0.0.1:{os.environ.get('RAY_DASHBOARD_PORT', '8265')}"


def use_token_auth_if_present() -> None:
    """Once a token exists, clusters started here require it and clients must send it: do that quietly
    (for this process and the `ray` command it runs)."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    has_token = os.environ.get("RAY_AUTH_TOKEN") or (token_file.is_file() and token_file.stat().st_size > 0)
    if "RAY_AUTH_MODE" not in os.environ and has_token:
        os.environ["RAY_AUTH_MODE"] = "token"


def runtime_env(address: str) -> dict:
    """What travels with the job: code, config and the environment variables that locate stores and data."""
    uri = tracking_uri()
    host = urlparse(address if "://" in address else "//" + address).hostname or ""
    if uri.startswith("sqlite:") and host not in LOCAL_HOSTS:
        print(f"warning: runs go to {uri} on the cluster's machines; set MLFLOW_TRACKING_URI to an MLflow "
              "server both sides reach", file=sys.stderr)
    env = {"MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
           "PYTHONUNBUFFERED": "1"}
    if os.environ.get("NCF_DATA_DIR"):
        env["NCF_DATA_DIR"] = os.path.abspath(os.environ["NCF_DATA_DIR"])
    env |= {name: os.environ[name] for name in FORWARDED if os.environ.get(name)}
    return {"working_dir": ".", "excludes": EXCLUDES, "env_vars": env}


def job_exit_code(address: str, submission_id: str) -> int | None:
    """The job driver's own exit code (`ray job submit` exits 1 for any failure); None when unknown."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address).get_job_info(submission_id).driver_exit_code
    except Exception:  # the job never started, or the cluster is gone: `ray job submit` said why
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    module, args = argv[0], argv[1:]
    address = cluster_address()
    use_token_auth_if_present()
    submission_id = f"ncf-{module.removeprefix('jobs.')}-{time.strftime('%Y%m%d-%H%M%S')}-{random.randrange(10**6)}"
    ray = Path(sys.executable).with_name("ray")
    # A file, not --runtime-env-json: credentials in it would show on the command line (ps) otherwise.
    with tempfile.NamedTemporaryFile("w", prefix="ncf-runtime-env-", suffix=".yaml") as spec:  # mode 0600
        yaml.safe_dump(runtime_env(address), spec)
        spec.flush()
        rc = subprocess.run([str(ray), "job", "submit", "--address", address, "--submission-id", submission_id,
                             "--runtime-env", spec.name, "--", "python", "-m", module, *args], check=False).returncode
    if rc != 0:
        code = job_exit_code(address, submission_id)
        rc = code if code else rc
        print(f"job {submission_id} ended with exit code {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
