"""Prepared data: one pass to typed Parquet + manifest, reused while its inputs are unchanged, rebuilt when a
source file or the split config changes, never half-written; the fold protocol on the ml-100k fixture."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import prepare as prepare_job
from ncf import prepared
from ncf.config import Config, DataConfig, with_values
from ncf.data import DataError, MovieLens
from ncf.movielens_files.ratings import read_dataset, read_fold
from ncf.prepared import load_movielens

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FOLDS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")


@pytest.fixture
def source(tiny_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny dataset (ml-latest-small's format)."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "source"))


@pytest.fixture
def cfg(tiny_config: Config, tmp_path: Path) -> DataConfig:
    return with_values(tiny_config, {"data.prepared_dir": str(tmp_path / "prepared")}).data


def with_split(cfg: DataConfig, **split) -> DataConfig:
    return cfg.model_copy(update={"split": cfg.split.model_copy(update=split)})


def outputs_mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def assert_same_data(a: MovieLens, b: MovieLens) -> None:
    for part in ("train", "validation", "test"):
        for field in ("user", "movie", "rating", "timestamp"):
            got, want = (getattr(getattr(d.splits, part), field) for d in (a, b))
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(a.ids.user_ids, b.ids.user_ids)
    np.testing.assert_array_equal(a.ids.movie_ids, b.ids.movie_ids)
    assert a.movies.equals(b.movies) and a.checksums == b.checksums


# ----------------------------------------------------------------------------- layout


def test_prepared_copy_is_typed_parquet_with_ids_movies_statistics_and_manifest(cfg, source):
    result = prepared.prepare(cfg, source)
    folder = result.folder
    assert result.built and folder == Path(cfg.prepared_dir) / "ml-latest-small"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["manifest.json", "stats.json", "movies.parquet", "users.parquet", "train.parquet", "validation.parquet",
         "test.parquet"])
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    for part in ("train", "validation", "test"):
        assert pq.read_schema(folder / f"{part}.parquet").remove_metadata() == pa.schema(
            [("user", pa.int32()), ("movie", pa.int32()), ("rating", pa.float32()), ("timestamp", pa.int64())])
    assert pq.read_schema(folder / "users.parquet").field("userId").type == pa.int32()
    assert pq.read_schema(folder / "movies.parquet").names == ["movieId", "title", "genres"]

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["config"]["name"] == "ml-latest-small" and manifest["config"]["split"]["protocol"] == "seed"
    assert set(manifest["source"]["files"]) == {"movies.csv", "ratings.csv"}
    assert manifest["source"]["files"]["ratings.csv"]["sha256"] == cfg.published.sha256["ratings.csv"]
    assert manifest["sizes"] == {"train": 2213, "validation": 271, "test": 621}
    stats = json.loads((folder / "stats.json").read_text())
    assert (stats["ratings"], stats["users"], stats["movies"], stats["rated_movies"]) == (3105, 60, 405, 400)
    assert sum(stats["rating_counts"].values()) == 3105 and stats["ratings_per_user"]["min"] >= 1
    assert stats["splits"]["test"]["ratings"] == 621


def test_load_reads_the_prepared_copy(cfg, source, tiny_movielens):
    data = load_movielens(cfg, source)
    assert_same_data(data, tiny_movielens)
    assert data.splits.train.user.dtype == np.int64 and data.splits.train.rating.dtype == np.float64
    assert data.movies["movieId"].dtype == np.int64
    assert data.genres.shape == (405, len(data.genre_names))


# ----------------------------------------------------------------------------- reuse and rebuild


def test_reused_while_nothing_changed(cfg, source):
    first = prepared.prepare(cfg, source)
    before = outputs_mtimes(first.folder)
    again = prepared.prepare(cfg, source)
    assert first.built and not again.built
    assert outputs_mtimes(again.folder) == before  # not one file rewritten
    assert again.manifest["created"] == first.manifest["created"]


def test_reused_when_a_file_is_touched_or_copied_but_unchanged(cfg, source, tmp_path):
    prepared.prepare(cfg, source)
    os.utime(source / "ratings.csv", ns=(1, 1))  # another stat, the same content: hashed again, still valid
    assert not prepared.prepare(cfg, source).built
    elsewhere = Path(shutil.copytree(source, tmp_path / "copy"))  # the same files in another folder
    assert not prepared.prepare(cfg, elsewhere).built
    recorded = json.loads((prepared.location(cfg) / "manifest.json").read_text())["source"]
    assert recorded["folder"] == str(elsewhere.resolve())
    assert recorded["files"]["ratings.csv"]["mtime_ns"] == (elsewhere / "ratings.csv").stat().st_mtime_ns


def test_rebuilt_when_a_source_file_changes(cfg, source):
    cfg = cfg.model_copy(update={"datasets": {**cfg.datasets, "ml-latest-small": cfg.published.model_copy(
        update={"sha256": {}, "sizes": None})}})  # files of our own: no known digests
    first = load_movielens(cfg, source)
    lines = (source / "ratings.csv").read_text().splitlines(keepends=True)
    (source / "ratings.csv").write_text("".join(lines[:-1]))  # one rating fewer
    result = prepared.prepare(cfg, source)
    assert result.built
    data = prepared.read(result.folder)
    total = lambda d: sum(d.splits.sizes().values())  # noqa: E731
    assert total(data) == total(first) - 1
    assert data.checksums["ratings.csv"] != first.checksums["ratings.csv"]


def test_a_changed_checksummed_file_is_refused_and_the_valid_copy_kept(cfg, source):
    first = prepared.prepare(cfg, source)
    with open(source / "movies.csv", "ab") as f:
        f.write(b"999999,Extra (2020),Drama\n")
    with pytest.raises(DataError, match=r"movies\.csv is corrupt or modified"):
        load_movielens(cfg, source)
    assert json.loads((first.folder / "manifest.json").read_text())["created"] == first.manifest["created"]
    assert not [p.name for p in first.folder.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("change", [{"validation_fraction": 0.2}, {"protocol": "temporal"}, {"protocol": "random"},
                                    {"test_fraction": 0.25}])
def test_rebuilt_when_the_split_config_changes(cfg, source, change):
    first = prepared.prepare(cfg, source)
    changed = with_split(cfg, **change)
    second = prepared.prepare(changed, source)
    assert second.built and second.manifest["config"]["split"] == changed.split.model_dump()
    assert second.manifest["sizes"] != first.manifest["sizes"]
    assert not prepared.prepare(changed, source).built
    assert prepared.prepare(cfg, source).built  # and back


def test_the_log_says_why_it_was_rebuilt(cfg, source, capfd):
    cfg = cfg.model_copy(update={"datasets": {**cfg.datasets, "ml-latest-small": cfg.published.model_copy(
        update={"sha256": {}, "sizes": None})}})  # files of our own: no known digests
    prepared.prepare(cfg, source)
    assert "(no prepared copy yet)" in capfd.readouterr().err
    prepared.prepare(with_split(cfg, seed=7), source)
    assert "(the data config changed (data.split))" in capfd.readouterr().err
    with open(source / "ratings.csv", "ab") as f:
        f.write(b"60,10,4.0,1500000000\n")
    prepared.prepare(with_split(cfg, seed=7), source)
    assert f"({source / 'ratings.csv'} changed)" in capfd.readouterr().err


def test_a_copy_replaced_while_it_is_read_is_read_again(cfg, source, monkeypatch):
    prepared.prepare(cfg, source)
    real, reads = prepared._ratings, []

    def racing(path: Path):
        reads.append(path.name)
        if len(reads) == 1:
            prepared.prepare(cfg, source, force=True)  # another process rebuilds it meanwhile
        return real(path)

    monkeypatch.setattr(prepared, "_ratings", racing)
    data = load_movielens(cfg, source)
    assert reads == ["train.parquet", "validation.parquet", "test.parquet"] * 2  # the first read was discarded
    assert data.splits.sizes() == {"train": 2213, "validation": 271, "test": 621}


def test_half_written_copy_is_never_used(cfg, source):
    folder = prepared.prepare(cfg, source).folder
    (folder / "manifest.json").unlink()  # as if a build had stopped before its manifest
    assert prepared.prepare(cfg, source).built
    (folder / "test.parquet").unlink()
    assert prepared.prepare(cfg, source).built


def test_malformed_source_leaves_nothing_half_written(cfg, source):
    cfg = cfg.model_copy(update={"datasets": {**cfg.datasets, "ml-latest-small": cfg.published.model_copy(
        update={"sha256": {}, "sizes": None})}})
    lines = (source / "ratings.csv").read_text().splitlines(keepends=True)
    lines[41] = "7,14,3.5,notatime\n"
    (source / "ratings.csv").write_text("".join(lines))
    with pytest.raises(DataError, match=rf"{source / 'ratings.csv'}, line 42: non-integer timestamp 'notatime'"):
        prepared.prepare(cfg, source)
    root = Path(cfg.prepared_dir)
    assert not root.exists() or list(root.iterdir()) == []


# ----------------------------------------------------------------------------- the fold protocol (ml-100k)


@pytest.fixture
def ml_100k(config: Config, tmp_path: Path) -> Config:
    """ml-100k's format on its fixture: files of our own, so no published digests or sizes."""
    return with_values(config, {"data.name": "ml-100k", "data.dir": str(FIXTURES / "movielens" / "ml-100k"),
                                "data.datasets.ml-100k.sha256": {}, "data.datasets.ml-100k.sizes": None,
                                "data.prepared_dir": str(tmp_path / "prepared"), "data.split.protocol": "fold"})


def raw_pairs(data: MovieLens, part) -> set[tuple[int, int]]:
    users, movies = data.ids.user_ids[part.user], data.ids.movie_ids[part.movie]
    return set(zip(users.tolist(), movies.tolist(), strict=True))


@pytest.mark.parametrize("fold", FOLDS)
def test_fold_protocol_takes_the_folds_own_split(ml_100k: Config, fold: str):
    cfg = with_values(ml_100k, {"data.split.fold": fold}).data
    data = load_movielens(cfg)
    base, test = read_fold(Path(cfg.dir), fold)
    pairs = lambda frame: set(zip(frame["userId"].tolist(), frame["movieId"].tolist(), strict=True))  # noqa: E731
    assert raw_pairs(data, data.splits.test) == pairs(test)
    assert raw_pairs(data, data.splits.train_and_validation()) == pairs(base)
    assert data.splits.sizes() == {"train": 15, "validation": 5, "test": 5}  # 5 users x 4 base ratings: 3 + 1
    # The ids span all of u.data and u.item, whatever the fold.
    ratings, movies = read_dataset("ml-100k", Path(cfg.dir))
    np.testing.assert_array_equal(data.ids.user_ids, np.unique(ratings["userId"]))
    assert data.n_movies == len(movies) == 10
    # Validation: the last tenth (rounded up) of each user's base ratings by time, as the other protocols carve it.
    last_train = {}
    for u, t in zip(data.splits.train.user.tolist(), data.splits.train.timestamp.tolist(), strict=True):
        last_train[u] = max(last_train.get(u, t), t)
    assert all(t >= last_train[u] for u, t in zip(data.splits.validation.user.tolist(),
                                                  data.splits.validation.timestamp.tolist(), strict=True))
    assert set(data.checksums) == {"u.data", "u.item", "u.genre", f"{fold}.base", f"{fold}.test"}


def test_another_fold_rebuilds(ml_100k: Config):
    first = prepared.prepare(with_values(ml_100k, {"data.split.fold": "u1"}).data, Path(ml_100k.data.dir))
    second = prepared.prepare(with_values(ml_100k, {"data.split.fold": "u2"}).data, Path(ml_100k.data.dir))
    assert first.built and second.built
    assert set(second.manifest["source"]["files"]) == {"u.data", "u.item", "u.genre", "u2.base", "u2.test"}


def test_fold_that_is_not_a_split_of_u_data_is_refused(ml_100k: Config, tmp_path: Path):
    folder = Path(shutil.copytree(FIXTURES / "movielens" / "ml-100k", tmp_path / "ml-100k"))
    base = (folder / "u3.base").read_bytes().split(b"\n")
    (folder / "u3.base").write_bytes(b"\n".join(base[1:]))  # one rating lost
    cfg = with_values(ml_100k, {"data.split.fold": "u3", "data.dir": str(folder)}).data
    with pytest.raises(DataError, match=r"u3\.base \+ u3\.test \(24 rows\) are not the 25 ratings of u\.data"):
        load_movielens(cfg)


# ----------------------------------------------------------------------------- make prepare


def test_prepare_job_builds_then_reuses(tiny_dir: Path, tiny_config: Config, tmp_path: Path, capsys):
    args = ["--set", f"data.dir={tiny_dir}", "--set", f"data.prepared_dir={tmp_path / 'prepared'}",
            "--set", f"data.datasets.ml-latest-small.sha256={tiny_config.data.published.sha256}"]
    assert prepare_job.main(args) == 0
    assert "built in" in capsys.readouterr().out
    assert prepare_job.main(args) == 0
    out = capsys.readouterr().out
    assert "still valid, reused" in out and "train 2,213, validation 271, test 621" in out and "peak RSS" in out
    assert prepare_job.main([*args, "--set", "data.dir=" + str(tmp_path / "nowhere")]) == 1
