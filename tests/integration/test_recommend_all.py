"""`make recommend-all` (jobs.recommend_all) on a real local Ray cluster and a real MLflow store: the champion of
a tiny model trained by the real train job on the tiny dataset, every user's top-k written part by part, re-runs
that skip what is written, and the errors a user can meet."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs import recommend_all
from ncf.config import Config, load_config
from ncf.integrations import mlflow_tracking
from workflows.training_run import train_and_publish

pytestmark = pytest.mark.integration

K = 10
USERS_PER_PART = 16  # the tiny dataset's 60 users: 4 parts, the last one short


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh MLflow store (the env var every process reads); NCF_DATA_DIR unset, so the tiny dataset is used."""
    saved = {name: os.environ.pop(name, None) for name in ("MLFLOW_TRACKING_URI", "NCF_DATA_DIR")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield os.environ["MLFLOW_TRACKING_URI"]
    os.environ.pop("MLFLOW_TRACKING_URI")
    os.environ.update({name: value for name, value in saved.items() if value is not None})


@pytest.fixture(scope="module")
def champion(store, tiny_config: Config, tiny_training_overrides: list[str], tmp_path_factory) -> str:
    """The train job (in-process launcher) on the tiny dataset; its model is the first, hence the champion."""
    data = [f"data.{key}={json.dumps(value)}" for key, value in tiny_config.data.model_dump(mode="json").items()]
    config = load_config([*tiny_training_overrides, *data, f"train.checkpoint_dir={tmp_path_factory.mktemp('ckpt')}"],
                         preset="tiny")
    summary, promoted = train_and_publish(config, launcher="local", report_path=None)
    assert promoted
    return summary.model_version


@pytest.fixture(scope="module")
def recommender(champion, tmp_path_factory):
    """The champion as serving loads it: what every row is checked against."""
    return mlflow_tracking.load_recommender(f"models:/{mlflow_tracking.MODEL_NAME}/{champion}",
                                            str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recommendations")


def run(out: Path) -> dict:
    return recommend_all.run(mlflow_tracking.MODEL_NAME, k=K, out=out, users_per_part=USERS_PER_PART, actors=2)


def part_files(out: Path) -> dict[str, int]:
    """Each part file's name and modification time (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "parts").glob("part-*.parquet"))}


@pytest.fixture(scope="module")
def first_run(local_ray, champion, out) -> dict:
    return run(out)


def test_every_user_gets_k_distinct_unseen_movies_ranked_as_served(first_run, champion, recommender, out):
    assert first_run | {"seconds": 0, "users_per_s": 0, "part_seconds": 0} == {
        "model": mlflow_tracking.MODEL_NAME, "version": champion, "run_id": first_run["run_id"], "k": K,
        "users": 60, "parts": 4, "parts_written": 4, "parts_skipped": 0, "users_written": 60, "rows": 60 * K,
        "seconds": 0, "users_per_s": 0, "part_seconds": 0}
    assert 0 < first_run["part_seconds"] < first_run["seconds"]
    assert json.loads((out / "summary.json").read_text()) == first_run
    assert list(part_files(out)) == [f"part-{p:05d}.parquet" for p in range(4)]
    rows = pd.read_parquet(out / "parts")
    assert list(rows.columns) == ["user_id", "rank", "movie_id", "score", "predicted_rating", "strength",
                                  "user_weight", "movie_weight"]
    assert sorted(rows["user_id"].unique()) == recommender.ids.user_ids.tolist()
    per_user = rows.groupby("user_id")
    assert (per_user.size() == K).all() and (per_user["movie_id"].nunique() == K).all()
    assert all(ranks == list(range(1, K + 1)) for ranks in per_user["rank"].apply(list))
    assert (per_user["score"].apply(lambda s: bool(np.all(np.diff(s.to_numpy()) <= 0)))).all()  # best first
    users = recommender.user_indices(rows["user_id"].to_numpy())
    seen = {(u, m) for u, m in zip(recommender.history.user.tolist(), recommender.history.movie.tolist(), strict=True)}
    assert not {(u, m) for u, m in zip(users.tolist(), recommender.movie_indices(rows["movie_id"]).tolist(),
                                       strict=True)} & seen, "a recommended movie the user has rated"

    # A few users' rows are the recommender's own ranking of their profiles, with what the model says of each pair.
    some = recommender.ids.user_ids[[0, 17, 59]]
    top, scores = recommender.rank_profiles(recommender.profiles_of(recommender.user_indices(some)), K)
    mine = rows[rows["user_id"].isin(some)].sort_values(["user_id", "rank"])
    assert mine["movie_id"].tolist() == recommender.ids.movie_ids[top.ravel()].tolist()
    np.testing.assert_allclose(mine["score"], scores.ravel(), rtol=1e-5)
    pairs = recommender.predict_pairs(mine["user_id"], mine["movie_id"])
    for column in ("predicted_rating", "strength", "user_weight", "movie_weight"):
        np.testing.assert_allclose(mine[column], pairs[column], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mine["user_weight"] + mine["movie_weight"], 1, atol=1e-5)

    record = json.loads(pq.read_schema(out / "parts" / "part-00003.parquet").metadata[recommend_all.METADATA_KEY])
    assert record == {"model": mlflow_tracking.MODEL_NAME, "version": champion, "k": K,
                      "users_per_part": USERS_PER_PART, "n_users": 60, "part": 3, "first_user": 48, "end_user": 60}


def test_a_second_run_skips_every_part(first_run, out):
    before = part_files(out)
    start = time.perf_counter()
    again = run(out)
    assert time.perf_counter() - start < 10  # no Ray Data pipeline, no model loaded: the registry and ids only
    assert (again["parts_written"], again["parts_skipped"], again["users_written"]) == (0, 4, 0)
    assert again["rows"] == 60 * K
    assert part_files(out) == before


def test_a_deleted_part_is_the_only_one_rewritten(first_run, out):
    lost = out / "parts" / "part-00001.parquet"
    expected = pd.read_parquet(lost)
    before = part_files(out)
    lost.unlink()
    (out / "parts" / ".part-00002.parquet.0123456789ab.tmp").write_bytes(b"a run stopped mid-write")
    again = run(out)
    assert (again["parts_written"], again["parts_skipped"], again["users_written"]) == (1, 3, USERS_PER_PART)
    after = part_files(out)
    assert {name for name in after if after[name] != before.get(name)} == {lost.name}
    pd.testing.assert_frame_equal(pd.read_parquet(lost), expected)
    assert not list((out / "parts").glob(".part-*")), "the leftover temporary file is gone"


def test_a_folder_of_another_k_is_refused_and_force_rebuilds_it(first_run, out, capsys):
    before = part_files(out)
    code = recommend_all.main(["--k", "5", "--out", str(out), "--users-per-part", str(USERS_PER_PART)])
    assert code == 2
    error = capsys.readouterr().err
    assert "k=10" in error and "k=5" in error and "--force" in error
    assert part_files(out) == before  # nothing touched

    layout = json.loads(pq.read_schema(out / "parts" / "part-00000.parquet").metadata[recommend_all.METADATA_KEY])
    other = {key: layout[key] for key in recommend_all.LAYOUT} | {"k": 5}
    assert recommend_all.pending_parts(out / "parts", other, 4, force=True) == [0, 1, 2, 3]
    assert part_files(out) == {}


@pytest.mark.parametrize("args, named", [(["--model", "no-such-model"], "models:/no-such-model@champion"),
                                         (["--alias", "no-such-alias"], "models:/ncf-movielens@no-such-alias"),
                                         (["--version", "99"], "models:/ncf-movielens/99")])
def test_an_unknown_model_alias_or_version_is_a_clear_error(champion, args, named, capsys, tmp_path):
    assert recommend_all.main([*args, "--out", str(tmp_path)]) == 2
    assert f"no model version at {named}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
