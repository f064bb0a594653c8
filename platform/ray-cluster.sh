#!/usr/bin/env bash
# A Ray cluster on this machine for the platform's jobs (the Makefile's cluster-up and cluster-down targets;
# jobs are submitted to it by `python -m jobs.submit`, behind `make submit-train` / `make submit-tune`).
#
#   platform/ray-cluster.sh up [ray start options]     the head (dashboard + job API on 127.0.0.1) and, with
#                                                      NODES > 1, worker nodes joined to it
#   platform/ray-cluster.sh down                       `ray stop`: every Ray process on this machine
#
# NODES=1 (default): one head that runs the jobs and their work. NODES=N > 1: a head that takes no work
# (--num-cpus 0 --num-gpus 0: job drivers run there, training workers and trials never do) and N-1 worker
# nodes joined with `ray start --address <head's GCS>`, each with RAY_WORKER_CPUS CPUs (default: this
# machine's cores shared among them). On one machine each worker node gets its own ports and its own temp
# dir, node-<n> inside the head's (a shared one would let a node clean up a job's files, its working_dir
# included, while the head's driver still runs in them). The head's GCS listens on RAY_PORT (default
# 6379); the options after `up` go to the head (a --port or --temp-dir among them is followed);
# RAY_WORKER_ARGS holds more `ray start` options for each worker node (e.g. --object-store-memory).
set -euo pipefail
cd "$(dirname "$0")/.."

# The nodes, their workers and the jobs' `python` are this project's virtual environment.
export PATH="$PWD/.venv/bin:$PATH"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
NODES="${NODES:-1}"
GCS_PORT="${RAY_PORT:-6379}"

case "${1:-}" in
  up)
    shift
    if ! [[ "$NODES" =~ ^[1-9][0-9]*$ ]]; then
      echo "NODES must be a whole number of nodes, 1 or more (got '$NODES')" >&2
      exit 2
    fi
    head=(ray start --head --port "$GCS_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT")
    if [[ "$NODES" == 1 ]]; then
      exec "${head[@]}" "$@"
    fi
    # The head's GCS port and temp dir as the options give them (the last one wins, as in `ray start`).
    temp_dir="${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray"  # Ray's default
    for ((i = 1; i <= $#; i++)); do
      j=$((i + 1))
      case "${!i}" in
        --block) echo "--block needs NODES=1: a multi-node cluster runs in the background until" \
                      "'$0 down'" >&2; exit 2 ;;
        --port) GCS_PORT="${!j}" ;;
        --port=*) GCS_PORT="${!i#--port=}" ;;
        --temp-dir) temp_dir="${!j}" ;;
        --temp-dir=*) temp_dir="${!i#--temp-dir=}" ;;
      esac
    done
    workers=$((NODES - 1))
    cpus="${RAY_WORKER_CPUS:-$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))}"
    # A head turns token authentication on by itself when a token exists; joining nodes must be told.
    token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ -z "${RAY_AUTH_MODE:-}" && ( -n "${RAY_AUTH_TOKEN:-}" || -s "$token_file" ) ]]; then
      export RAY_AUTH_MODE=token
    fi
    # Options given later win: the caller's may still give the head CPUs.
    "${head[@]}" --num-cpus 0 --num-gpus 0 "$@"
    for ((n = 1; n <= workers; n++)); do
      echo "worker node $n of $workers: $cpus CPUs, joining 127.0.0.1:$GCS_PORT"
      # Ports left to Ray are picked free per node; the dashboard agent's fixed default would collide.
      # shellcheck disable=SC2086  # RAY_WORKER_ARGS is a list of options
      ray start --address "127.0.0.1:$GCS_PORT" --num-cpus "$cpus" --temp-dir "$temp_dir/node-$n" \
        --dashboard-agent-listen-port 0 ${RAY_WORKER_ARGS:-}
    done
    ;;
  down)
    exec ray stop
    ;;
  *)
    echo "usage: [NODES=N] $0 up [ray start options for the head] | $0 down" >&2
    exit 2
    ;;
esac
