#!/usr/bin/env bash
# A Ray cluster for the platform's jobs (the Makefile's cluster-up and cluster-down targets;
# jobs are submitted to it by `python -m jobs.submit`, behind `make submit-train` / `make submit-tune`).
#
#   platform/ray-cluster.sh up [ray start options]     a local head; dashboard + job API on 127.0.0.1
#   platform/ray-cluster.sh down                       `ray stop`: every Ray process on this machine
set -euo pipefail
cd "$(dirname "$0")/.."

# The head, its workers and the jobs' `python` are this project's virtual environment.
export PATH="$PWD/.venv/bin:$PATH"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"

case "${1:-}" in
  up)
    shift
    exec ray start --head --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" "$@"
    ;;
  down)
    exec ray stop
    ;;
  *)
    echo "usage: $0 up [ray start options] | down" >&2
    exit 2
    ;;
esac
