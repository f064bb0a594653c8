"""The Ray Data input path (`data.loader: ray_data`) end to end: the train job with two Ray Train workers
on a real local Ray cluster, a synthetic dataset in the ml-25m format, a real MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from services import private_ray

from jobs import synth
from ncf import prepared
from ncf.config import ConfigError, load_config
from ncf.integrations.ray_data import CHECKSUM_MODULUS, pair_checksum, training_datasets, worker_data
from workflows.training_run import train_and_publish

pytestmark = pytest.mark.integration



def _shards(client: MlflowClient, run_id: str, world_size: int) -> dict[int, list[tuple[int, int]]]:
    """Per epoch (MLflow step), each rank's (rows, checksum) as the run logged them."""
    by_epoch: dict[int, list[tuple[int, int]]] = {}
    for rank in range(world_size):
        rows = {m.step: int(m.value) for m in client.get_metric_history(run_id, f"shard/{rank}/rows")}
        sums = {m.step: int(m.value) for m in client.get_metric_history(run_id, f"shard/{rank}/checksum")}
        assert rows.keys() == sums.keys(), (rank, rows, sums)
        for step in rows:
            by_epoch.setdefault(step, []).append((rows[step], sums[step]))
    return by_epoch


def _assert_disjoint_cover(shards: list[tuple[int, int]], users: np.ndarray, movies: np.ndarray) -> None:
    """Equal shards that are disjoint and together cover the split: their rows add up to its size and their
    checksums to its checksum (equal shards drop at most world_size - 1 rows: then the difference is the
    checksum of that many of the split's rows; checked here for the one row two workers may drop)."""
    world_size = len(shards)
    rows = [r for r, _ in shards]
    assert len(set(rows)) == 1 and rows[0] > 0, f"equal, non-empty shards: {rows}"
    dropped = len(users) - sum(rows)
    assert 0 <= dropped < world_size, (len(users), rows)
    missing = (pair_checksum(users, movies) - sum(c for _, c in shards)) % CHECKSUM_MODULUS
    if dropped == 0:
        assert missing == 0, "the shards are not a disjoint cover of the split"
    else:
        assert world_size == 2, "this check handles one dropped row"
        per_row = {pair_checksum(users[i: i + 1], movies[i: i + 1]) for i in range(len(users))}
        assert missing in per_row, "the shards are not a disjoint cover of the split less one row"


def test_two_workers_train_on_disjoint_reshuffled_shards_and_the_run_is_registered(tmp_path, monkeypatch):
    monkeypatch.delenv("NCF_DATA_DIR", raising=False)  # it would win over data.dir
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    synth.generate("tiny", tmp_path / "data", seed=0, verbose=False)
    config = load_config(["data.name=ml-25m", f"data.dir={tmp_path / 'data'}",
                          "data.datasets.ml-25m.sizes=null", f"data.prepared_dir={tmp_path / 'prepared'}",
                          "data.loader=ray_data", "train.num_workers=2", "train.cpus_per_worker=1",
                          "train.max_epochs=2", "train.patience=5", f"train.checkpoint_dir={tmp_path / 'ckpt'}"])
    with private_ray():
        summary, _ = train_and_publish(config, launcher="ray", report_path=tmp_path / "metrics.json")

    client = MlflowClient()
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.loader"] == "ray_data"
    assert 0.5 < run.data.metrics["test_rmse"] < 2.0
    assert "test_full_ndcg_at_10" in run.data.metrics and "val_full_ndcg_at_10" in run.data.metrics
    version = client.get_model_version(summary.model_name, summary.model_version)
    assert summary.model_name == "ncf-ml-25m" and version.run_id == summary.run_id
    assert json.loads((tmp_path / "metrics.json").read_text())["models"]["ncf"]["rmse"] == pytest.approx(
        run.data.metrics["test_rmse"])

    folder = prepared.location(config.data)
    train = pq.read_table(folder / "train.parquet")
    validation = pq.read_table(folder / "validation.parquet")
    epochs = _shards(client, summary.run_id, world_size=2)
    phases = {m.step: m.value for m in client.get_metric_history(summary.run_id, "phase")}
    search = sorted(step for step, phase in phases.items() if phase == 0)
    refit = sorted(step for step, phase in phases.items() if phase == 1)
    assert search == [1, 2] and refit and sorted(epochs) == search + refit
    users, movies = train.column("user").to_numpy(), train.column("movie").to_numpy()
    for step in search:
        _assert_disjoint_cover(epochs[step], users, movies)
    assert epochs[1] != epochs[2], "each epoch reshuffles which ratings go to which worker"
    both = np.concatenate([users, validation.column("user").to_numpy()]), np.concatenate(
        [movies, validation.column("movie").to_numpy()])
    for step in refit:
        _assert_disjoint_cover(epochs[step], *both)


def test_workers_read_only_what_their_rank_needs(tiny_config, tiny_dir):
    folder = prepared.prepare(tiny_config.data, tiny_dir).folder
    every = prepared.read(folder)
    (first, validation), (other, elsewhere) = (worker_data(tiny_config, folder, rank) for rank in (0, 1))
    for data in (first, other):
        assert (data.n_users, data.n_movies) == (every.n_users, every.n_movies)
        np.testing.assert_array_equal(data.genres, every.genres)
        assert data.splits.sizes() == {"train": 0, "validation": 0, "test": 0}  # no worker keeps a split
    # Rank 0's validation was built from the train split (its seen movies, its retriever) before it went.
    assert len(validation.seen.indices) == len(every.splits.train)
    assert validation.retriever is not None and len(validation.target) == len(every.splits.validation)
    assert not hasattr(elsewhere, "seen")  # other ranks only receive rank 0's figures

    users, movies = every.splits.train.user, every.splits.train.movie
    whole = pair_checksum(users, movies)
    assert (pair_checksum(users[:100], movies[:100]) + pair_checksum(users[100:], movies[100:])) \
        % CHECKSUM_MODULUS == whole
    assert pair_checksum(users[::-1], movies[::-1]) == whole
    assert pair_checksum(users[1:], movies[1:]) != whole
    assert pair_checksum(movies, users) != whole


def test_objectives_that_sample_negatives_are_refused(tmp_path):
    config = load_config(["data.loader=ray_data", "model.objective=joint"])
    with pytest.raises(ConfigError, match="data.loader ray_data trains the rating objective only"):
        training_datasets(config, tmp_path)  # refused before any data is read
