#!/usr/bin/env bash
# An MLflow tracking server for the platform's jobs (the Makefile's mlflow-server target): a PostgreSQL
# backend store and artifacts proxied by the server to an S3-compatible store (or a local folder).
# It runs in the foreground; Ctrl-C or SIGTERM stops everything it started and exits 0.
#
#   platform/mlflow-server.sh
#
# Environment (all optional):
#   MLFLOW_HOST, MLFLOW_PORT       where the server listens (127.0.0.1, 5050)
#   MLFLOW_BACKEND_STORE_URI       an existing database (postgresql://user:pw@host:port/db); without it, a
#                                  project-local PostgreSQL is initialised once in MLFLOW_PG_DIR and reused
#   MLFLOW_PG_DIR, MLFLOW_PG_PORT  that local PostgreSQL: its folder (mlruns/postgres) and 127.0.0.1 port (5433)
#   MLFLOW_PG_BIN                  the folder of initdb/pg_ctl (default: on PATH, else the newest
#                                  /usr/lib/postgresql/*/bin)
#   MLFLOW_ARTIFACTS_DESTINATION   where the server stores artifacts, e.g. s3://bucket/prefix (with
#                                  MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY for the
#                                  server only: clients go through the server's artifact proxy and need no
#                                  credentials); default: the folder mlruns/server-artifacts
#   MLFLOW_ALLOWED_HOSTS           comma-separated Host headers the server accepts besides loopback (see below)
#
# The local PostgreSQL (MLFLOW_PG_DIR): data/ (the cluster, owned by the user PostgreSQL runs as: `postgres`
# when this script runs as root, else the caller), run/ (its unix socket, mode 0700), postgres.log, and
# password (the role `mlflow`'s password for TCP connections on 127.0.0.1, readable by the caller only).
# MLflow itself connects through the unix socket. Relative paths are relative to the caller's directory.
set -euo pipefail

CALLER_DIR="$PWD"
cd "$(dirname "$0")/.."
REPO="$PWD"

abspath() {  # a path given by the caller, made absolute against the caller's directory
  case "$1" in
    /*) realpath -m -- "$1" ;;
    *) realpath -m -- "$CALLER_DIR/$1" ;;
  esac
}

HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5050}"
PG_PORT="${MLFLOW_PG_PORT:-5433}"
if [[ -n "${MLFLOW_PG_DIR:-}" ]]; then PG_DIR="$(abspath "$MLFLOW_PG_DIR")"; else PG_DIR="$REPO/mlruns/postgres"; fi
PG_DATA="$PG_DIR/data"
PG_SOCKET_DIR="$PG_DIR/run"
PG_LOG="$PG_DIR/postgres.log"
PG_ROLE="mlflow"
PG_DATABASE="mlflow"
MLFLOW="$REPO/.venv/bin/mlflow"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
# MLflow's job runner (GenAI jobs: prompt optimisation, scorers, trace roll-ups) would start 8 more processes;
# the platform uses none of it. MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true turns it back on.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

die() { echo "mlflow-server: $*" >&2; exit 1; }
[[ -x "$MLFLOW" ]] || die "$MLFLOW not found: run \`make venv\` first"
need_module() {  # a Python package the server needs for this configuration
  "$REPO/.venv/bin/python" -c "import $1" 2>/dev/null || die "the server needs the Python package $2 in .venv: run \`make venv\`"
}

STOPPING=0     # set by Ctrl-C / SIGTERM
PG_STARTED=0   # 1 once this script started PostgreSQL (and so must stop it)
SERVER_PID=""

as_pg() {  # run a PostgreSQL program as the user that owns the cluster
  if [[ $EUID -eq 0 ]]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi
}

# shellcheck disable=SC2317  # run by the EXIT trap, which shellcheck does not follow
stop_server() {  # the server's process group: the mlflow CLI, uvicorn and whatever they started
  [[ -n "$SERVER_PID" ]] || return 0
  if kill -0 -- "-$SERVER_PID" 2>/dev/null; then
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 -- "-$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    if kill -0 -- "-$SERVER_PID" 2>/dev/null; then
      echo "mlflow-server: the MLflow server did not stop in 30 s: killing it" >&2
      kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    fi
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

# shellcheck disable=SC2317  # run by the EXIT trap, which shellcheck does not follow
stop_postgres() {
  (( PG_STARTED )) || return 0
  if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null; then
    echo "mlflow-server: fast shutdown failed; stopping PostgreSQL immediately" >&2
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate -w -t 30 stop >/dev/null || true
  fi
  PG_STARTED=0
}

# shellcheck disable=SC2317  # run by the EXIT trap, which shellcheck does not follow
cleanup() {
  trap '' INT TERM  # a second Ctrl-C does not interrupt the shutdown
  stop_server
  stop_postgres
}
trap 'STOPPING=1' INT TERM
trap cleanup EXIT

stop_if_asked() {  # a signal that came during a setup step ends the script cleanly after that step
  if (( STOPPING )); then exit 0; fi
}

redact() {  # a URI without its password (user:secret@host -> user:***@host; ?password=secret -> ?password=***)
  sed -E -e 's#^([A-Za-z0-9+.-]+://[^:/@]*):[^@/]*@#\1:***@#' -e 's#([?&]password=)[^&]*#\1***#g' <<<"$1"
}

# ----------------------------------------------------------------------------- backend store

find_pg_bin() {
  if [[ -n "${MLFLOW_PG_BIN:-}" ]]; then echo "$MLFLOW_PG_BIN"; return; fi
  # (initdb on PATH may be a link to the real folder, which also has psql and createdb)
  if command -v initdb >/dev/null; then dirname "$(realpath "$(command -v initdb)")"; return; fi
  local candidates=(/usr/lib/postgresql/*/bin/initdb)
  [[ -x "${candidates[0]}" ]] || die "PostgreSQL's initdb/pg_ctl not found: install PostgreSQL (Debian: apt-get install postgresql) or set MLFLOW_PG_BIN"
  dirname "$(printf '%s\n' "${candidates[@]}" | sort -V | tail -n 1)"
}

start_local_postgres() {
  need_module psycopg "psycopg[binary]"
  PG_BIN="$(find_pg_bin)"
  local program
  for program in initdb pg_ctl psql createdb; do
    [[ -x "$PG_BIN/$program" ]] || die "no $program in $PG_BIN (set MLFLOW_PG_BIN to PostgreSQL's bin folder)"
  done
  if [[ $EUID -eq 0 ]]; then
    PG_OS_USER="postgres"  # initdb and postgres refuse to run as root
    id -u "$PG_OS_USER" >/dev/null 2>&1 || die "running as root needs the system user '$PG_OS_USER' to run PostgreSQL"
  else
    PG_OS_USER="$(id -un)"
  fi

  mkdir -p "$PG_DIR"
  if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
    echo "mlflow-server: creating the PostgreSQL cluster in $PG_DATA (once)"
    mkdir -p "$PG_DATA"
    [[ -z "$(ls -A "$PG_DATA")" ]] || die "$PG_DATA is not empty and holds no PostgreSQL cluster"
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$PG_DIR/password")
    if [[ $EUID -eq 0 ]]; then chown "$PG_OS_USER:" "$PG_DATA"; fi
    chmod 0700 "$PG_DATA"
    as_pg test -x "$PG_DIR" -a -w "$PG_DATA" ||
      die "the user '$PG_OS_USER' cannot reach $PG_DATA: make its parent folders traversable (chmod o+x) or set MLFLOW_PG_DIR elsewhere"
    # The bootstrap superuser is `mlflow`: trusted on the unix socket (a folder only its owner and root can
    # enter), password-only (scram-sha-256) on 127.0.0.1. initdb reads the password from a file of its own.
    local pwfile
    pwfile="$(mktemp "$PG_DIR/.pwfile.XXXXXX")"
    cat "$PG_DIR/password" >"$pwfile"
    if [[ $EUID -eq 0 ]]; then chown "$PG_OS_USER:" "$pwfile"; fi
    if ! as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_ROLE" --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --no-locale >"$PG_DIR/initdb.log" 2>&1; then
      rm -f "$pwfile"
      die "initdb failed: see $PG_DIR/initdb.log"
    fi
    rm -f "$pwfile"
  fi
  stop_if_asked

  if as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    die "a PostgreSQL server already runs on $PG_DATA (not started by this script): stop it first ($PG_BIN/pg_ctl -D $PG_DATA stop)"
  fi
  mkdir -p "$PG_SOCKET_DIR"
  touch "$PG_LOG"
  if [[ $EUID -eq 0 ]]; then chown "$PG_OS_USER:" "$PG_SOCKET_DIR" "$PG_LOG"; fi
  chmod 0700 "$PG_SOCKET_DIR"
  PG_STARTED=1  # from here on, the EXIT trap stops it (pg_ctl stop is harmless if the start failed)
  # pg_ctl puts the postmaster in a session of its own: Ctrl-C reaches it only through this script's cleanup.
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 120 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k '$PG_SOCKET_DIR' -c unix_socket_permissions=0700" \
    start >/dev/null || die "PostgreSQL did not start: see $PG_LOG"
  stop_if_asked

  local exists
  exists="$(as_pg "$PG_BIN/psql" -h "$PG_SOCKET_DIR" -p "$PG_PORT" -U "$PG_ROLE" -d postgres -XtAq \
    -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'")"
  if [[ "$exists" != "1" ]]; then
    as_pg "$PG_BIN/createdb" -h "$PG_SOCKET_DIR" -p "$PG_PORT" -U "$PG_ROLE" "$PG_DATABASE"
  fi
  stop_if_asked

  local socket
  socket="$("$REPO/.venv/bin/python" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' \
    "$PG_SOCKET_DIR")"
  # The driver is named: SQLAlchemy 2.1 reads a plain postgresql:// as psycopg (3), 2.0 as psycopg2.
  BACKEND_URI="postgresql+psycopg://$PG_ROLE@/$PG_DATABASE?host=$socket&port=$PG_PORT"
  BACKEND_SHOWN="local PostgreSQL, database $PG_DATABASE on 127.0.0.1:$PG_PORT (role $PG_ROLE, password in $PG_DIR/password; data in $PG_DATA)"
}

if [[ -n "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
  BACKEND_URI="$MLFLOW_BACKEND_STORE_URI"
  BACKEND_SHOWN="$(redact "$BACKEND_URI")"
else
  start_local_postgres
fi

# ----------------------------------------------------------------------------- artifacts and the server

if [[ -n "${MLFLOW_ARTIFACTS_DESTINATION:-}" ]]; then
  ARTIFACTS="$MLFLOW_ARTIFACTS_DESTINATION"
  if [[ "$ARTIFACTS" == s3://* ]]; then need_module boto3 boto3; fi
  ARTIFACTS_SHOWN="$(redact "$ARTIFACTS")${MLFLOW_S3_ENDPOINT_URL:+ (S3 endpoint $(redact "$MLFLOW_S3_ENDPOINT_URL"))}"
else
  ARTIFACTS="$REPO/mlruns/server-artifacts"
  mkdir -p "$ARTIFACTS"
  ARTIFACTS_SHOWN="$ARTIFACTS"
fi

# The backend URI reaches the server through its environment (the option's envvar), not its command line,
# so a password in it does not show in `ps`. --serve-artifacts (MLflow's default) makes new experiments'
# artifact location `mlflow-artifacts:/`: clients upload and download through this server.
export MLFLOW_BACKEND_STORE_URI="$BACKEND_URI"
args=(server --host "$HOST" --port "$PORT" --workers 1 --serve-artifacts --artifacts-destination "$ARTIFACTS")
# MLflow's security middleware answers 403 to a Host header it does not know (/health excepted); by default it
# knows localhost and private IP addresses only. Clients that reach the server by a name (in a cluster: the
# Kubernetes service) must be listed in MLFLOW_ALLOWED_HOSTS, as they send it: with the port unless it is 80,
# e.g. "mlflow:5050,mlflow.<namespace>.svc.cluster.local:5050", or "mlflow:*" (fnmatch patterns). The list
# replaces MLflow's defaults, so loopback is added back here (add "10.*" etc. for clients that use pod IPs).
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS,localhost,localhost:*,127.0.0.1,127.0.0.1:*")
fi

echo "mlflow-server: http://$HOST:$PORT (backend: $BACKEND_SHOWN; artifacts: $ARTIFACTS_SHOWN, proxied as mlflow-artifacts:/); Ctrl-C stops it"
# Job control gives the server a process group of its own (its id: SERVER_PID), which the cleanup stops whole.
set -m
"$MLFLOW" "${args[@]}" </dev/null &
SERVER_PID=$!
set +m

status=0
wait "$SERVER_PID" || status=$?
if (( STOPPING )); then
  exit 0  # the EXIT trap stops the server and PostgreSQL
fi
SERVER_PID=""
echo "mlflow-server: the MLflow server exited with status $status" >&2
exit "$status"
