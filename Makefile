# One command per step; every target installs what it needs first (see `venv`). `make help` lists them.
SHELL := /bin/bash
PY := .venv/bin/python
ARGS ?=
export RAY_USAGE_STATS_ENABLED ?= 0

.DEFAULT_GOAL := help
.PHONY: help venv train train-local test test-unit lint ui bench-train gpu-train clean

help:  ## list every target with what it does
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):[^#]*## (.*)/\1\t\2/' | \
		awk -F'\t' '{printf "  make %-16s %s\n", $$1, $$2}'

# torch is installed on its own first: a CPU build, so no multi-GB CUDA build is pulled in.
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: .venv/.installed  ## create .venv and install the project with its test tools

# Presets: conf/presets/<name>.yaml over the defaults (deck: the deck's model; neumf: the NCF paper's;
# recommender: the best top-N model).
PRESET ?= deck

train: venv  ## train under Ray Train (PRESET=deck|history|neumf|recommender|tiny), evaluate, log to MLflow, register the model
	$(PY) -m jobs.train --preset $(PRESET) $(ARGS)

train-local: venv  ## the same training loop in this process (debugging)
	$(PY) -m jobs.train --launcher local --preset $(PRESET) $(ARGS)

test: venv  ## every test: unit, integration (real Ray, MLflow, HTTP) and e2e (browser)
	$(PY) -m pytest --durations=15 $(ARGS)

test-unit: venv  ## the hermetic unit tests only (no data folder, network, Ray cluster or browser)
	$(PY) -m pytest -m unit $(ARGS)

lint: venv  ## ruff
	$(PY) -m ruff check .

.PHONY: mlflow-server
mlflow-server: venv  ## MLflow server on 127.0.0.1:5050 (MLFLOW_PORT): PostgreSQL in mlruns/postgres, artifacts to MLFLOW_ARTIFACTS_DESTINATION or mlruns/server-artifacts; Ctrl-C stops it
	platform/mlflow-server.sh

UI_PORT ?= 5000
ui: venv  ## MLflow UI on 127.0.0.1:5000 (UI_PORT) against the store the jobs use (MLFLOW_TRACKING_URI or ./mlruns)
	.venv/bin/mlflow ui --backend-store-uri "$$($(PY) -c "from ncf.integrations.mlflow_tracking import tracking_uri; print(tracking_uri())")" --host 127.0.0.1 --port $(UI_PORT) --workers 1

bench-train: venv  ## epoch time in-process vs Ray Train (1 and 2 workers) -> docs/benchmarks/
	$(PY) -m jobs.bench_train $(ARGS)

gpu-train: venv  ## short training on every visible GPU, reports throughput
	$(PY) -m jobs.bench_train --gpu $(ARGS)

.PHONY: bench-retrieval
bench-retrieval: venv  ## EASE, ALS and the sequence signal: settings chosen on validation, scored once on test (NCF_DATA_DIR or data.dir: ml-latest-small) -> docs/benchmarks/retrieval.md
	$(PY) -m jobs.bench_retrieval $(ARGS)

# SASRec (rectools) needs numpy < 2, pandas < 3 and pm-implicit: a virtualenv of its own, never the project's.
.venv-peers/.installed:
	python3 -m venv .venv-peers
	.venv-peers/bin/python -m pip install -q --upgrade pip
	.venv-peers/bin/python -m pip install -q torch==2.13.0
	.venv-peers/bin/python -m pip install -q 'rectools[torch]==0.19.*'
	touch $@

.PHONY: peers
PROTOCOL ?= seed
peers: venv .venv-peers/.installed  ## most-popular, EASE, ALS, itemknn, SASRec and the presets side by side on full ranking (PROTOCOL=seed|temporal), each a run of the MLflow experiment `peers` -> docs/benchmarks/peers.md
	$(PY) -m jobs.peers --protocol $(PROTOCOL) --sasrec-python .venv-peers/bin/python $(ARGS)

.PHONY: bench-history
bench-history: venv  ## the history model: settings chosen on validation, 3 seeds on test beside EASE -> docs/benchmarks/history.md
	$(PY) -m jobs.bench_history $(ARGS)

.PHONY: bench-scale
bench-scale: venv  ## training throughput and worker memory on ml-25m's shape vs ml-latest-small (after make synth SHAPE=ml-25m) -> docs/benchmarks/
	$(PY) -m jobs.bench_scale $(ARGS)

clean:  ## remove checkpoints and metric reports (keeps the MLflow store)
	rm -rf checkpoints reports/*.json reports/*.md

.PHONY: prepare
prepare: venv  ## parse, validate, encode and split data.name once into typed Parquet + manifest (reused until a source file or the data config changes)
	$(PY) -m jobs.prepare $(ARGS)

.PHONY: synth
SHAPE ?= tiny
SYNTH_OUT ?= data/synth/$(SHAPE)
synth: venv  ## synthetic MovieLens in the ml-25m CSV format: SHAPE=tiny|small|ml-100k ... ml-25m|ml-32m [SYNTH_OUT=dir]
	$(PY) -m jobs.synth --shape $(SHAPE) --out $(SYNTH_OUT) $(ARGS)

# ---- Hyperparameter search, and the jobs on a Ray cluster (RAY_ADDRESS; default: the local head) ----
.PHONY: tune cluster-up cluster-down submit-train submit-tune

tune: venv  ## Ray Tune + Optuna + ASHA sweep (conf/tune.yaml); best model registered, champion if better; ARGS=--resume continues one
	$(PY) -m jobs.tune --preset $(PRESET) $(ARGS)

NODES ?= 1
cluster-up: venv  ## a local Ray cluster, job API on 127.0.0.1:8265 (RAY_DASHBOARD_PORT); NODES=N>1: a head with no work + N-1 worker nodes
	NODES=$(NODES) platform/ray-cluster.sh up

cluster-down:  ## stop the local Ray cluster, every node (`ray stop`: every Ray process on this machine)
	platform/ray-cluster.sh down

submit-train: venv  ## the train job as a Ray job at RAY_ADDRESS: code uploaded, logs followed, exit code kept
	$(PY) -m jobs.submit jobs.train --preset $(PRESET) $(ARGS)

submit-tune: venv  ## the sweep as a Ray job at RAY_ADDRESS (same as submit-train)
	$(PY) -m jobs.submit jobs.tune --preset $(PRESET) $(ARGS)

# ---- Continuous training: the champion retrained on the live ratings ----
.PHONY: retrain submit-retrain

# Without PRESET= the champion's settings; PRESET=name trains with that preset's instead.
retrain: venv  ## challenger on the dataset + live ratings up to a cut, compared with the champion on a fresh hold-out; alias challenger if it passes the offline gate
	$(PY) -m jobs.retrain $(if $(filter command line environment,$(origin PRESET)),--preset $(PRESET)) $(ARGS)

submit-retrain: venv  ## the retrain job as a Ray job at RAY_ADDRESS (same as submit-train)
	$(PY) -m jobs.submit jobs.retrain $(if $(filter command line environment,$(origin PRESET)),--preset $(PRESET)) $(ARGS)

.PHONY: check-deploy
check-deploy: venv  ## validate platform/ offline (Dockerfiles, KubeRay manifests, ray-cluster.yaml) against conf/ and the installed Ray
	$(PY) -m jobs.check_deployment

# ---- Serving: the champion over HTTP (API + web page), and its load test ----
.PHONY: serve bench-serve bench-feedback promote

serve: venv  ## API and web page on 127.0.0.1:8000 (conf/serve.yaml) following the champion; Ctrl-C stops it
	$(PY) -m serving $(ARGS)

promote: venv  ## decide the online experiment now (champion vs challenger alias): promote on evidence or roll back
	$(PY) -m jobs.promote $(ARGS)

bench-serve: venv  ## load test of /recommend vs the naive path, loopback only -> docs/benchmarks/serve_load.md
	$(PY) -m jobs.bench_serve $(ARGS)

bench-feedback: venv  ## live ratings: prequential replay live vs frozen, freshness, ingestion, fold-in -> docs/benchmarks/feedback.md
	$(PY) -m jobs.bench_feedback $(ARGS)

.PHONY: bench-loop
bench-loop: venv  ## the closed loop simulated on the seed split: serve, collect, retrain, experiment at 50%, decide -> docs/benchmarks/loop.md
	$(PY) -m jobs.bench_loop $(ARGS)

# ---- Batch: every user's recommendations at once ----
.PHONY: recommend-all

recommend-all: venv  ## every user's top-k from the champion with Ray Data -> reports/recommendations/<model>/v<version>/ (ARGS="--k 20 --version 3 ...")
	$(PY) -m jobs.recommend_all $(ARGS)
