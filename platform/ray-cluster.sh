#!/usr/bin/env bash
# A Ray cluster for the platform's jobs (the Makefile's cluster-up, cluster-down, submit-* targets).
#
#   platform/ray-cluster.sh up [ray start options]     a local head; dashboard + job API on 127.0.0.1
#   platform/ray-cluster.sh down                       `ray stop`: every Ray process on this machine
#   platform/ray-cluster.sh submit <module> [args]     `python -m <module> args` as a Ray job at RAY_ADDRESS
#
# RAY_ADDRESS: the cluster's job API (default: the local head, http://127.0.0.1:$RAY_DASHBOARD_PORT).
# MLFLOW_TRACKING_URI: where the job records its runs (default: this project's SQLite store, which
# only a cluster on this machine can reach; give remote clusters an MLflow server URL).
set -euo pipefail
cd "$(dirname "$0")/.."

# The head, its workers and the jobs' `python` are this project's virtual environment.
export PATH="$PWD/.venv/bin:$PATH"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:$DASHBOARD_PORT}"

# Once a token exists, clusters started here require it and clients must send it: do that quietly.
token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
if [[ -z "${RAY_AUTH_MODE:-}" && ( -n "${RAY_AUTH_TOKEN:-}" || -s "$token_file" ) ]]; then
  export RAY_AUTH_MODE=token
fi

submit() {
  local module="$1"; shift
  local id="ncf-${module#jobs.}-$(date +%Y%m%d-%H%M%S)-$RANDOM"
  local runtime_env
  runtime_env="$(python - "$ADDRESS" <<'PY'
import json, os, sys
from urllib.parse import urlparse
from ncf.tracking import tracking_uri

uri = tracking_uri()
host = urlparse(sys.argv[1] if "://" in sys.argv[1] else "//" + sys.argv[1]).hostname or ""
if uri.startswith("sqlite:") and host not in ("127.0.0.1", "localhost", "auto"):
    print(f"warning: runs go to {uri} on the cluster's machines; set MLFLOW_TRACKING_URI to an MLflow "
          "server both sides reach", file=sys.stderr)
env = {"MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": os.environ["RAY_USAGE_STATS_ENABLED"],
       "PYTHONUNBUFFERED": "1"}
if os.environ.get("NCF_DATA_DIR"):
    env["NCF_DATA_DIR"] = os.path.abspath(os.environ["NCF_DATA_DIR"])
print(json.dumps({
    "working_dir": ".",
    # Only code and config travel: no environment, stores, checkpoints, reports or tests.
    "excludes": [".git", ".venv", "mlruns", "checkpoints", "reports", "docs", "tests", "data",
                 "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"],
    "env_vars": env,
}))
PY
)"
  local rc=0
  ray job submit --address "$ADDRESS" --submission-id "$id" --runtime-env-json "$runtime_env" \
    -- python -m "$module" "$@" || rc=$?
  if [[ $rc -ne 0 ]]; then
    # `ray job submit` exits 1 for any failure; hand back the job's own exit code when it has one.
    local code
    code="$(python - "$ADDRESS" "$id" <<'PY' 2>/dev/null || true
import sys
from ray.job_submission import JobSubmissionClient

info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])
print(info.driver_exit_code if info.driver_exit_code is not None else "")
PY
)"
    [[ -n "$code" && "$code" != 0 ]] && rc="$code"
    echo "job $id ended with exit code $rc" >&2
  fi
  return "$rc"
}

case "${1:-}" in
  up)
    shift
    exec ray start --head --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" "$@"
    ;;
  down)
    exec ray stop
    ;;
  submit)
    shift
    [[ $# -ge 1 ]] || { echo "usage: $0 submit <module> [args]" >&2; exit 2; }
    submit "$@"
    ;;
  *)
    echo "usage: $0 up [ray start options] | down | submit <module> [args]" >&2
    exit 2
    ;;
esac
