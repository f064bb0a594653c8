"""The sweep end to end on a real local Ray cluster and a real MLflow store: tiny trials (a
16-dim model, 1-2 epochs), child runs per trial, the registered version, the champion decision
both ways, an interrupted sweep resumed, and multi-worker trials under a TorchTrainer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import ray
from mlflow import MlflowClient

from jobs import tune as tune_job
from ncf.config import load_config
from ncf.integrations import mlflow_tracking
from ncf.integrations.ray_cluster import init_ray
from ncf.training.validation import Validation
from workflows.sweep_trials import TRIAL_TAG, dropout_schedule, shared_retriever, trial_config
from workflows.training_run import train_and_publish

pytestmark = pytest.mark.integration

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The gate here compares validation RMSE: the learning rates below make it clearly better or worse, while the
# served ranking's NDCG (mostly the retriever's) could tie. The default gate, on val_full_ndcg_at_10, has its
# own tests in tests/unit/test_champion_gate.py.
TINY = ["model.hidden_dims=[32, 16]", "model.dropouts=[0.1, 0.0]", "tune.startup_trials=1",
        "registry.champion_metric=best_val_rmse",
        "tune.space.model.embedding_dim={choice: [16]}", "tune.space.train.batch_size={choice: [1024]}"]
# Learning rates that make a sweep's best trial clearly better, or clearly worse, than the other side.
GOOD = ["tune.space.train.learning_rate={loguniform: [0.002, 0.004]}"]
WEAK = ["tune.space.train.learning_rate={loguniform: [0.00005, 0.0001]}"]

ROOT = Path(__file__).resolve().parents[2]  # the repository


@dataclass
class Env:
    uri: str
    checkpoints: Path
    ray_address: str

    def overrides(self, *extra: str) -> list[str]:
        return [arg for item in (*TINY, *extra, f"train.checkpoint_dir={self.checkpoints}") for arg in ("--set", item)]

    def sweep_runs(self) -> list:
        """Every sweep's parent run in this module's store, oldest first."""
        return mlflow.search_runs(filter_string="tags.`ncf.kind` = 'sweep'", output_format="list",
                                  order_by=["start_time ASC"])

    def children(self, parent_run_id: str) -> list:
        return mlflow.search_runs(filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  output_format="list")


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir):
    """A fresh MLflow store and a local 2-CPU Ray cluster of this module's own."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow_tracking.setup()
    # The jobs' own start: a private cluster with RAY_ADDRESS pinned for its processes (without it, with
    # other Ray clusters on the machine, a multi-worker trial that ASHA stops leaks its CPUs).
    assert "RAY_ADDRESS" not in os.environ, "the tests start their own cluster"
    init_ray()
    try:
        yield Env(uri, tmp_path_factory.mktemp("checkpoints"), ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="module")
def weak_champion(env) -> tuple[str, float]:
    """The incumbent: a one-epoch model at a tiny learning rate from the train job (version 1)."""
    config = load_config([*TINY[:2], "registry.champion_metric=best_val_rmse", "model.embedding_dim=16",
                          "train.batch_size=1024", "train.learning_rate=0.0001",
                          "train.max_epochs=1", "train.refit=false", f"train.checkpoint_dir={env.checkpoints}"])
    summary, promoted = train_and_publish(config, launcher="local", report_path=None)
    assert promoted and summary.model_version == "1"
    return summary.model_version, summary.best_val_rmse


@pytest.fixture(scope="module")
def resumed_sweep(env, weak_champion, tmp_path_factory):
    """A good sweep (3 trials x 2 epochs) run as users run it, interrupted with Ctrl-C after its
    first epoch, then resumed with `--resume`."""
    report = tmp_path_factory.mktemp("reports") / "tune.md"
    args = [*env.overrides(*GOOD, "tune.num_samples=3", "tune.max_epochs=2"),
            "--report", str(report)]
    child_env = dict(os.environ, RAY_ADDRESS=env.ray_address, PYTHONUNBUFFERED="1")
    job = subprocess.Popen([sys.executable, "-m", "jobs.tune", *args], cwd=ROOT, env=child_env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    before = []
    for line in job.stdout:
        before.append(line)
        if "epoch   1" in line:
            job.send_signal(signal.SIGINT)
            break
    before.append(job.stdout.read())
    interrupted_rc = job.wait(timeout=120)
    interrupted_runs = env.sweep_runs()
    resumed_rc = tune_job.main(["--resume", *env.overrides(), "--report", str(report)])
    return {"interrupted_rc": interrupted_rc, "output": "".join(before), "interrupted_runs": interrupted_runs,
            "resumed_rc": resumed_rc, "report": report}


@pytest.fixture(scope="module")
def worse_sweep(env, resumed_sweep):
    """A weak sweep whose 2 trials each run a 2-worker TorchTrainer, 1 epoch; half a CPU per worker
    lets both trials run at once."""
    known = {run.info.run_id for run in env.sweep_runs()}
    rc = tune_job.main([*env.overrides(*WEAK, "tune.num_samples=2", "tune.max_epochs=1", "train.refit=false",
                                       "tune.workers_per_trial=2", "tune.cpus_per_worker=0.5"),
                        "--report", str(resumed_sweep["report"].with_name("worse.md"))])
    [parent] = [run for run in env.sweep_runs() if run.info.run_id not in known]
    return rc, parent


def test_trial_config_applies_sampled_values_budget_and_resources():
    base = load_config(["model.hidden_dims=[64, 32, 16]", "model.dropouts=[0.1, 0.1, 0.0]", "tune.max_epochs=4",
                        "tune.cpus_per_worker=1"])
    config = trial_config(base, {"model.dropouts": 0.4, "train.batch_size": 512, "model.use_bias": True})
    assert config.model.dropouts == dropout_schedule(0.4, 3) == [0.4, 0.2, 0.0]
    assert (config.train.batch_size, config.model.use_bias) == (512, True)
    assert (config.train.max_epochs, config.train.cpus_per_worker, config.train.refit) == (4, 1, False)
    assert trial_config(base, {}, refit=True).train.refit is True


def test_a_sweep_fits_its_retriever_once_unless_trials_change_it(tiny_config, tiny_movielens):
    """With no `retrieval` key searched, one-worker trials validate with one retriever the sweep fitted (a history
    model takes minutes to fit); searched retriever keys or multi-worker trials fit their own."""
    data = [f"data.dir={tiny_config.data.dir}"]
    config = load_config(data, preset="tiny")
    shared = shared_retriever(config, tiny_movielens)
    assert shared is not None and shared.name == config.retrieval.retriever
    assert Validation(config, tiny_movielens, rank=0, retriever=shared).retriever is shared
    for changing in ("tune.space={retrieval: {ease.regularization: {choice: [10.0, 100.0]}}}",
                     "tune.space={train: {seed: {choice: [0, 1]}}}", "tune.workers_per_trial=2",
                     "retrieval.retriever=none"):
        assert shared_retriever(load_config([*data, changing], preset="tiny"), tiny_movielens) is None, changing


def test_search_space_must_name_config_keys():
    with pytest.raises(ValueError, match="tune.space.model.embeding_dim is not a model, train, retrieval config key"):
        load_config(["tune.space.model={embeding_dim: {choice: [8]}}"])
    with pytest.raises(ValueError, match="exactly one of"):
        load_config(["tune.space.train.batch_size={choice: [8], uniform: [1, 2]}"])


def test_interrupted_sweep_resumes_into_the_same_runs(env, resumed_sweep):
    assert resumed_sweep["interrupted_rc"] == tune_job.INTERRUPTED, resumed_sweep["output"]
    assert "--resume" in resumed_sweep["output"]
    [interrupted] = resumed_sweep["interrupted_runs"]
    assert interrupted.info.status == "KILLED"
    assert resumed_sweep["resumed_rc"] == 0
    [parent] = env.sweep_runs()
    assert parent.info.run_id == interrupted.info.run_id and parent.info.status == "FINISHED"
    children = env.children(parent.info.run_id)
    assert len(children) == 3 and len({c.data.tags[TRIAL_TAG] for c in children}) == 3
    # Named by what they are, the data they saw as the sweep's dataset inputs.
    what = f"{parent.data.params['preset']} {parent.data.params['data.name']}"
    assert parent.info.run_name.startswith(f"tune {what} (sweep-"), parent.info.run_name
    assert all(c.info.run_name == f"trial {what} {c.data.tags[TRIAL_TAG]}" for c in children)
    assert {i.dataset.name.rsplit("/", 1)[1] for i in parent.inputs.dataset_inputs} == {"train", "validation", "test"}
    client = MlflowClient()
    epochs = []
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["model.embedding_dim"] == "16"
        assert 0.002 <= float(child.data.params["train.learning_rate"]) <= 0.004
        steps = {m.step for m in client.get_metric_history(child.info.run_id, "val_rmse")}
        assert steps == set(range(1, len(steps) + 1))  # a restarted trial logs its epochs again, same steps
        epochs.append(len(steps))
    assert max(epochs) == 2 and sum(epochs) == parent.data.metrics["trial_epochs"]


def test_sweep_records_leaderboard_plot_and_best_config(env, resumed_sweep):
    [parent] = env.sweep_runs()
    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts >= {"sweep/leaderboard.md", "sweep/leaderboard.csv", "sweep/trials_vs_hyperparameters.png",
                         "sweep/best_config.yaml", "sweep/report.md"}
    board = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/sweep/leaderboard.csv").splitlines()
    assert len(board) == 1 + 3
    best = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/sweep/best_config.yaml")
    assert "refit: true" in best and "embedding_dim: 16" in best
    assert parent.data.metrics["trial_epochs"] <= parent.data.metrics["trial_epochs_without_asha_max"] == 6
    report = resumed_sweep["report"].read_text()
    assert "## Leaderboard" in report and "## Test metrics" in report


def test_better_sweep_model_is_registered_and_promoted(env, weak_champion, resumed_sweep):
    [parent] = env.sweep_runs()
    tags = parent.data.tags
    best_run = MlflowClient().get_run(tags["sweep.best_run_id"])
    assert best_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert best_run.data.metrics["test_rmse"] < 1.0 and "baselines/user_item_bias/test_rmse" in best_run.data.metrics
    version = MlflowClient().get_model_version(mlflow_tracking.MODEL_NAME, "2")
    assert version.run_id == best_run.info.run_id
    assert tags["champion.decision"] == "promoted"
    assert (tags["champion.candidate_version"], tags["champion.incumbent_version"]) == ("2", weak_champion[0])
    assert tags["champion.metric"] == "best_val_rmse"
    assert float(tags["champion.candidate_value"]) < float(tags["champion.incumbent_value"])
    assert float(tags["champion.incumbent_value"]) == pytest.approx(weak_champion[1], abs=1e-6)
    assert str(mlflow_tracking.champion_version().version) == "2"
    # The registry says what the version is without opening its run.
    # The default space searches objectives too: the tag must name the one the best trial trained.
    assert version.tags["objective"] == best_run.data.params["model.objective"] and version.tags["preset"] == "deck"
    assert "Validation full NDCG@10" in version.description


def test_multi_worker_trials_stream_their_epochs(env, worse_sweep):
    rc, parent = worse_sweep
    assert rc == 0
    children = env.children(parent.info.run_id)
    assert len(children) == 2
    for child in children:
        assert child.data.params["train.num_workers"] == "2"
        assert child.data.metrics["epoch_seconds"] > 0
        assert [m.step for m in MlflowClient().get_metric_history(child.info.run_id, "val_rmse")] == [1]


def test_worse_sweep_model_is_registered_but_not_promoted(env, worse_sweep):
    _, parent = worse_sweep
    tags = parent.data.tags
    assert tags["champion.decision"] == "kept"
    assert (tags["champion.candidate_version"], tags["champion.incumbent_version"]) == ("3", "2")
    assert float(tags["champion.candidate_value"]) > float(tags["champion.incumbent_value"])
    assert MlflowClient().get_model_version(mlflow_tracking.MODEL_NAME, "3").run_id == tags["sweep.best_run_id"]
    assert str(mlflow_tracking.champion_version().version) == "2"


def test_finished_sweep_is_not_resumed_twice(env, worse_sweep, capsys):
    assert tune_job.main(["--resume", *env.overrides()]) == 2
    assert "already finished" in capsys.readouterr().err
