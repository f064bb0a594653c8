"""Live ratings as training data: the cut and its hold-out, the checksum, and the prepared copy with live ratings
(new users appended, a pair rated again counted once with its latest rating, the manifest's live section), which
training reads like any prepared copy and which is never rebuilt from the source files alone."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from ncf import live_training, prepared
from ncf.config import Config, DataConfig, with_values
from ncf.data import DataError, MovieLens
from ncf.feedback_store import LiveRating
from ncf.prepared import load_movielens


def rating(seq: int, user: int, movie: int, value: float = 4.0) -> LiveRating:
    return LiveRating(seq, f"e{seq}", user, movie, value, 1_700_000_000 + seq, None, 1_700_000_000.0 + seq)


@pytest.fixture
def base(tiny_config: Config, tiny_dir: Path, tmp_path: Path) -> tuple[DataConfig, prepared.Prepared]:
    cfg = with_values(tiny_config, {"data.prepared_dir": str(tmp_path / "prepared")}).data
    return cfg, prepared.prepare(cfg, tiny_dir)


def live_cfg(cfg: DataConfig, target: Path) -> DataConfig:
    """The data config a retrain's workers load with: its prepared_dir is the live copy's root."""
    return cfg.model_copy(update={"prepared_dir": str(target.parent)})


def test_the_cut_keeps_the_newest_share_by_seq_as_the_hold_out():
    live = [rating(seq, 1, 100 + seq) for seq in (5, 1, 4, 2, 3, 10, 7, 9, 8, 6)]
    cut = live_training.cut(live, 0.2)
    assert [r.seq for r in cut.training] == list(range(1, 9))
    assert [r.seq for r in cut.holdout] == [9, 10]
    assert cut.cut_seq == 8
    assert cut.record() == {"cut_seq": 8, "ratings": 8, "sha256": cut.sha256, "holdout_ratings": 2}
    # At least one held out, at least one to train on; a single rating is training only.
    assert [len(live_training.cut(live[:2], 0.01).holdout), len(live_training.cut(live[:2], 0.99).training)] == [1, 1]
    assert (len(live_training.cut(live[:1], 0.5).training), live_training.cut([], 0.5).cut_seq) == (1, 0)


def test_the_checksum_is_stable_and_says_which_ratings():
    live = [rating(seq, 1, 100 + seq) for seq in range(1, 6)]
    shuffled = random.Random(0).sample(live, len(live))
    assert live_training.checksum(live) == live_training.checksum(shuffled)
    assert len(live_training.checksum(live)) == 64
    assert live_training.checksum(live) != live_training.checksum(live[:-1])
    changed = [*live[:-1], rating(5, 1, 105, value=3.5)]
    assert live_training.checksum(live) != live_training.checksum(changed)


def test_a_pair_rated_again_counts_once_with_its_latest_rating():
    live = [rating(1, 1, 10, 2.0), rating(2, 1, 11, 3.0), rating(3, 1, 10, 5.0), rating(4, 2, 10, 1.0)]
    assert [(r.user_id, r.movie_id, r.rating) for r in live_training.latest_per_pair(live)] == [
        (1, 11, 3.0), (1, 10, 5.0), (2, 10, 1.0)]


def test_live_only_users_must_come_after_the_dataset_users():
    users = np.array([1, 2, 60])
    assert live_training.extended_users(users, [rating(1, 70, 1), rating(2, 61, 1), rating(3, 2, 1)]).tolist() == [
        1, 2, 60, 61, 70]
    with pytest.raises(DataError, match="live user 3 is not in the dataset"):
        live_training.extended_users(users, [rating(1, 3, 1)])


def test_the_live_copy_adds_the_live_ratings_to_train_and_appends_new_users(base, tmp_path: Path,
                                                                            tiny_movielens: MovieLens):
    cfg, dataset = base
    data = tiny_movielens
    test = data.splits.test
    user0, movie0 = int(data.ids.user_ids[test.user[0]]), int(data.ids.movie_ids[test.movie[0]])  # a test pair
    train_user, train_movie = (int(data.ids.user_ids[data.splits.train.user[0]]),
                               int(data.ids.movie_ids[data.splits.train.movie[0]]))
    movie_ids = data.ids.movie_ids
    live = [rating(1, user0, movie0, 1.0), rating(2, 61, int(movie_ids[3]), 4.5), rating(3, 61, int(movie_ids[4])),
            rating(4, train_user, train_movie, 0.5), rating(5, user0, movie0, 5.0),  # rated again: 5.0 counts
            rating(6, 62, 999_999),  # a movie the dataset does not know: left out
            rating(7, 61, int(movie_ids[5])), rating(8, 63, int(movie_ids[6]))]  # the hold-out
    cut = live_training.cut(live, 0.25)
    target = live_training.live_location(tmp_path / "retrain", cut, cfg.name)
    manifest = live_training.write_live_copy(dataset.folder, cut, target)

    assert manifest["live"] | {"base_build": None} == {
        "cut_seq": 6, "ratings": 6, "sha256": live_training.checksum(live[:6]), "holdout_ratings": 2,
        "trained_ratings": 4, "unknown_movies": 1, "new_users": 2, "superseded_dataset_ratings": 2,
        "base_build": None}
    assert json.loads((target / "manifest.json").read_text())["live"] == manifest["live"]

    augmented = load_movielens(live_cfg(cfg, target), Path(cfg.dir))  # as a Ray Train worker loads it
    assert augmented.ids.user_ids.tolist() == [*data.ids.user_ids.tolist(), 61, 62]  # old indices unchanged
    np.testing.assert_array_equal(augmented.ids.movie_ids, data.ids.movie_ids)
    train = augmented.splits.train
    assert len(train) == len(data.splits.train) - 1 + 4  # the train pair rated again is replaced
    assert len(augmented.splits.test) == len(test) - 1  # the test pair rated live is training data now
    assert len(augmented.splits.validation) == len(data.splits.validation)
    pairs = {(int(augmented.ids.user_ids[u]), int(augmented.ids.movie_ids[m])): r
             for u, m, r in zip(train.user, train.movie, train.rating, strict=True)}
    assert pairs[(user0, movie0)] == 5.0 and pairs[(train_user, train_movie)] == 0.5
    assert pairs[(61, int(movie_ids[3]))] == 4.5
    assert (61, int(movie_ids[5])) not in pairs  # held out
    assert augmented.checksums == data.checksums


def test_a_live_copy_is_reused_but_never_silently_rebuilt(base, tmp_path: Path):
    cfg, dataset = base
    cut = live_training.cut([rating(1, 61, 14), rating(2, 1, 15)], 0.5)
    target = live_training.live_location(tmp_path / "retrain", cut, cfg.name)
    live_training.write_live_copy(dataset.folder, cut, target)
    source = Path(cfg.dir)
    assert not prepared.prepare(live_cfg(cfg, target), source).built
    other_split = live_cfg(cfg, target).model_copy(update={"split": cfg.split.model_copy(update={"seed": 7})})
    with pytest.raises(DataError, match="prepared copy with live ratings .* data config changed.* never rebuilt"):
        prepared.prepare(other_split, source)
    with pytest.raises(DataError, match="never rebuilt"):
        prepared.prepare(live_cfg(cfg, target), source, force=True)
    (target / "train.parquet").unlink()
    with pytest.raises(DataError, match="incomplete.* never rebuilt"):
        load_movielens(live_cfg(cfg, target), source)
    assert json.loads((target / "manifest.json").read_text())["live"]["cut_seq"] == 1  # left as it was


def test_only_a_copy_of_the_dataset_alone_gets_live_ratings(base, tmp_path: Path):
    cfg, dataset = base
    cut = live_training.cut([rating(1, 61, 14), rating(2, 1, 15)], 0.5)
    target = live_training.live_location(tmp_path / "retrain", cut, cfg.name)
    live_training.write_live_copy(dataset.folder, cut, target)
    with pytest.raises(DataError, match="no prepared copy of a dataset alone"):
        live_training.write_live_copy(target, cut, tmp_path / "again" / cfg.name)
