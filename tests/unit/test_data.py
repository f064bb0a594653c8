"""Data: verified loading through the one reading path (ncf.movielens_files' typed readers, the prepared copy),
malformed input named by file and line, the exact split protocols, ids, genres, batches (on the tiny
synthetic dataset; the figures of the real data are checked in tests/integration/test_real_data.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ncf.config import Config, with_values
from ncf.data import DataError, IdMaps, MovieLens, Ratings, genre_matrix, split_ratings
from ncf.prepared import load_movielens
from ncf.training.batches import epoch_batches

# ----------------------------------------------------------------------------- one reading path, validation

HEADER = "userId,movieId,rating,timestamp"
GOOD_LINES = ["1,10,4.0,964982703", "1,20,0.5,964982704", "2,10,5,964982705"]
MOVIES = "movieId,title,genres\n10,A (1990),Drama\n20,\"B, The (1991)\",Comedy\n"


def custom_config(config: Config, tmp_path: Path) -> Config:
    """ml-latest-small's format on files of our own: no known digests or sizes, prepared under tmp_path."""
    return with_values(config, {"data.datasets.ml-latest-small.sha256": {}, "data.datasets.ml-latest-small.sizes": None,
                                "data.prepared_dir": str(tmp_path / "prepared")})


def write_dataset(folder: Path, lines: list[str], movies: str = MOVIES) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "ratings.csv").write_text("\n".join([HEADER, *lines]) + "\n")
    (folder / "movies.csv").write_text(movies)
    return folder


def test_custom_files_load_typed(config: Config, tmp_path: Path):
    data = load_movielens(custom_config(config, tmp_path).data, write_dataset(tmp_path / "ml", GOOD_LINES))
    assert data.splits.sizes() == {"train": 0, "validation": 1, "test": 2}  # floor(80%) of 2 and 1 ratings
    np.testing.assert_array_equal(data.ids.user_ids, [1, 2])
    np.testing.assert_array_equal(data.ids.movie_ids, [10, 20])
    everything = data.splits.train_and_validation()
    assert everything.user.dtype == np.int64 and everything.rating.dtype == np.float64
    assert sorted(np.concatenate([everything.rating, data.splits.test.rating]).tolist()) == [0.5, 4.0, 5.0]
    assert data.movies["title"].tolist() == ["A (1990)", "B, The (1991)"]


@pytest.mark.parametrize(("bad_line", "what"), [
    ("u7,20,4.0,964982704", "non-integer userId 'u7'"),
    ("1.5,20,4.0,964982704", "non-integer userId '1.5'"),
    ("1,,4.0,964982704", "non-integer movieId ''"),
    ("1,20,3.7,964982704", "rating 3.7 outside the allowed values (half stars 0.5-5)"),
    ("1,20,6.0,964982704", "rating 6.0 outside the allowed values"),
    ("1,20,0,964982704", "rating 0.0 outside the allowed values"),
    ("1,20,four,964982704", "rating 'four' is not a number"),
    ("1,20,4.0,9649827x4", "non-integer timestamp '9649827x4'"),
    ("1,20,4.0,964982704.5", "non-integer timestamp '964982704.5'"),
    ("1,20,4.0", "expected 4 fields separated by ',', found 3"),
])
def test_malformed_line_is_named_by_file_and_line(config: Config, tmp_path: Path, bad_line, what):
    lines = list(GOOD_LINES)
    lines[1] = bad_line  # data row 2 = line 3 of the file, after the header
    folder = write_dataset(tmp_path / "ml", lines)
    with pytest.raises(DataError, match=rf"ratings\.csv, line 3: {re.escape(what)}") as err:
        load_movielens(custom_config(config, tmp_path).data, folder)
    assert str(folder / "ratings.csv") in str(err.value)


def test_duplicate_user_movie_is_named_by_line(config: Config, tmp_path: Path):
    folder = write_dataset(tmp_path / "ml", [*GOOD_LINES, "1,10,3.0,964982800"])  # repeats line 2, at line 5
    with pytest.raises(DataError, match=r"ratings\.csv, line 5: duplicate \(userId 1, movieId 10\), "
                                        r"already rated on line 2"):
        load_movielens(custom_config(config, tmp_path).data, folder)


def test_ratings_of_movies_missing_from_movies_csv_are_refused(config: Config, tmp_path: Path):
    folder = write_dataset(tmp_path / "ml", GOOD_LINES, movies="movieId,title,genres\n10,A (1990),Drama\n")
    with pytest.raises(DataError, match=r"ratings\.csv, line 3: movieId 20 is not in movies\.csv"):
        load_movielens(custom_config(config, tmp_path).data, folder)


def test_malformed_movies_line_is_named(config: Config, tmp_path: Path):
    folder = write_dataset(tmp_path / "ml", GOOD_LINES, movies=MOVIES + "x30,C (1992),Drama\n")
    with pytest.raises(DataError, match=r"movies\.csv, line 4: non-integer movieId 'x30'"):
        load_movielens(custom_config(config, tmp_path).data, folder)


def test_missing_column_is_refused(config: Config, tmp_path: Path):
    folder = write_dataset(tmp_path / "ml", GOOD_LINES)
    (folder / "ratings.csv").write_text("userId,movieId,score,timestamp\n1,10,4.0,100\n")
    with pytest.raises(DataError, match=r"ratings\.csv, line 1: expected the header 'userId,movieId,rating,timestamp'"):
        load_movielens(custom_config(config, tmp_path).data, folder)


def test_sizes_are_checked_where_no_digest_is_known(config: Config, tmp_path: Path):
    """Files without a known checksum are checked line by line and against the published sizes."""
    folder = write_dataset(tmp_path / "ml", GOOD_LINES)
    cfg = with_values(config, {"data.datasets.ml-latest-small.sha256": {}, "data.prepared_dir": str(tmp_path / "p")})
    with pytest.raises(DataError, match=r"ratings\.csv: 3 ratings, but the published ml-latest-small has 100,836"):
        load_movielens(cfg.data, folder)


def copy_dataset(source: Path, target: Path) -> Path:
    """A writable copy of the data files (the originals are read-only)."""
    target.mkdir()
    for name in ("movies.csv", "ratings.csv"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_corrupt_ratings_file_is_refused(tiny_dir: Path, tiny_config: Config, tmp_path: Path):
    folder = copy_dataset(tiny_dir, tmp_path / "ml")
    content = bytearray((folder / "ratings.csv").read_bytes())
    at = content.index(b"\n1,14,3.5,") + len(b"\n1,14,")  # the first rating
    content[at] = ord("4")  # 3.5 -> 4.5: still a well-formed CSV, only the checksum tells
    (folder / "ratings.csv").write_bytes(bytes(content))
    cfg = with_values(tiny_config, {"data.prepared_dir": str(tmp_path / "prepared")})
    with pytest.raises(DataError, match="ratings.csv is corrupt"):
        load_movielens(cfg.data, folder)


def test_missing_movies_file_is_refused(tiny_dir: Path, tiny_config: Config, tmp_path: Path):
    folder = copy_dataset(tiny_dir, tmp_path / "ml")
    (folder / "movies.csv").unlink()
    cfg = with_values(tiny_config, {"data.prepared_dir": str(tmp_path / "prepared")})
    with pytest.raises(DataError, match=r"movies\.csv is missing"):
        load_movielens(cfg.data, folder)


def test_tiny_dataset_loads_with_the_same_figures(tiny_movielens: MovieLens):
    """The ml-latest-small-format fixture through the one reading path: the figures it always had."""
    data = tiny_movielens
    assert (data.n_users, data.n_movies) == (60, 405)
    assert data.splits.sizes() == {"train": 2213, "validation": 271, "test": 621}  # as before the one path
    assert set(data.checksums) == {"movies.csv", "ratings.csv"}


# ----------------------------------------------------------------------------- seed split on the real data


def frame_of(ratings: Ratings, split: str) -> pd.DataFrame:
    return pd.DataFrame({"user": ratings.user, "movie": ratings.movie, "time": ratings.timestamp, "split": split})


def all_ratings(data: MovieLens) -> Ratings:
    s = data.splits
    return Ratings(*(np.concatenate([getattr(part, f) for part in (s.train, s.validation, s.test)])
                     for f in ("user", "movie", "rating", "timestamp")))


def test_seed_split_takes_floor_80_percent_of_each_user(tiny_movielens: MovieLens):
    s = tiny_movielens.splits
    n_all = np.bincount(all_ratings(tiny_movielens).user, minlength=tiny_movielens.n_users)
    n_train_full = np.bincount(s.train_and_validation().user, minlength=tiny_movielens.n_users)
    np.testing.assert_array_equal(n_train_full, np.floor(0.8 * n_all + 1e-9).astype(int))


def test_every_test_user_is_in_train(tiny_movielens: MovieLens):
    s = tiny_movielens.splits
    assert set(np.unique(s.test.user)) <= set(np.unique(s.train.user))


def test_test_ratings_are_each_users_future(tiny_movielens: MovieLens):
    s = tiny_movielens.splits
    last_train = frame_of(s.train_and_validation(), "train").groupby("user")["time"].max()
    first_test = frame_of(s.test, "test").groupby("user")["time"].min()
    assert (first_test >= last_train.reindex(first_test.index)).all()


def test_validation_is_the_most_recent_tenth_of_each_users_train(tiny_movielens: MovieLens):
    """The validation slice is carved from train the way test is carved from all ratings:
    per user, train keeps the first floor(0.9 n) by time, validation gets the rest."""
    s = tiny_movielens.splits
    n_full = np.bincount(s.train_and_validation().user, minlength=tiny_movielens.n_users)
    n_val = np.bincount(s.validation.user, minlength=tiny_movielens.n_users)
    np.testing.assert_array_equal(n_val, n_full - np.floor(0.9 * n_full + 1e-9).astype(int))
    last_train = frame_of(s.train, "train").groupby("user")["time"].max()
    first_val = frame_of(s.validation, "val").groupby("user")["time"].min()
    assert (first_val >= last_train.reindex(first_val.index)).all()
    # Validation never overlaps the test split.
    pairs = set(zip(s.validation.user.tolist(), s.validation.movie.tolist(), strict=True))
    assert not pairs & set(zip(s.test.user.tolist(), s.test.movie.tolist(), strict=True))


def test_temporal_split_cuts_at_one_time(tiny_movielens: MovieLens, config: Config):
    cfg = config.data.split.model_copy(update={"protocol": "temporal"})
    splits = split_ratings(all_ratings(tiny_movielens), cfg)
    n = len(all_ratings(tiny_movielens))
    assert len(splits.test) == n - int(np.floor(0.8 * n))
    assert splits.test.timestamp.min() >= splits.train_and_validation().timestamp.max()
    assert len(splits.train) + len(splits.validation) + len(splits.test) == n


def test_random_split_is_seeded(tiny_movielens: MovieLens, config: Config):
    ratings = all_ratings(tiny_movielens)
    cfg = config.data.split.model_copy(update={"protocol": "random"})
    first, again = split_ratings(ratings, cfg), split_ratings(ratings, cfg)
    other = split_ratings(ratings, cfg.model_copy(update={"seed": cfg.seed + 1}))
    assert len(first.test) == round(0.2 * len(ratings))
    for part in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(first, part).user, getattr(again, part).user)
        np.testing.assert_array_equal(getattr(first, part).movie, getattr(again, part).movie)
    assert len(other.test) == len(first.test)
    assert not np.array_equal(first.test.movie, other.test.movie)
    # A random split mixes time: the test set is not all in the future.
    assert first.test.timestamp.min() < first.train.timestamp.max()


# ----------------------------------------------------------------------------- ids and genres


def test_id_maps_round_trip(tmp_path: Path):
    ids = IdMaps(np.array([3, 7, 42], dtype=np.int64), np.array([1, 2, 5, 193609], dtype=np.int64))
    path = tmp_path / "ids.json"
    ids.save(path)
    loaded = IdMaps.load(path)
    np.testing.assert_array_equal(loaded.user_ids, ids.user_ids)
    np.testing.assert_array_equal(loaded.movie_ids, ids.movie_ids)
    assert (loaded.n_users, loaded.n_movies) == (3, 4)
    np.testing.assert_array_equal(loaded.user_index(np.array([42, 3, 7])), [2, 0, 1])
    np.testing.assert_array_equal(loaded.movie_index(np.array([193609, 1])), [3, 0])
    # Unknown ids: below, between and above the known ones.
    np.testing.assert_array_equal(loaded.user_index(np.array([1, 5, 43, 1000])), [-1, -1, -1, -1])
    np.testing.assert_array_equal(loaded.movie_index(np.array([0, 3, 200000])), [-1, -1, -1])
    # The single-id lookup agrees: known ids (numpy integers too) and the same unknown ones.
    assert [loaded.user_position(u) for u in (42, 3, np.int64(7))] == [2, 0, 1]
    assert [loaded.user_position(u) for u in (1, 5, 43, 1000)] == [None] * 4


def test_movies_span_the_whole_catalogue(tiny_movielens: MovieLens):
    data = tiny_movielens
    assert data.n_movies == len(data.movies) == 405
    assert len(np.unique(all_ratings(data).movie)) == 400  # some movies are never rated
    np.testing.assert_array_equal(data.movies["movieId"].to_numpy(), data.ids.movie_ids)
    assert (np.diff(data.ids.movie_ids) > 0).all()
    quoted = data.ids.movie_index(np.array([10]))[0]  # CSV quoting: a title with quotes
    assert data.movies.loc[quoted, "title"] == '"Quoted" Film 10 (2016)'
    assert data.movies["title"].str.contains(", ").any()


def test_genre_matrix_is_multi_hot():
    movies = pd.DataFrame({"movieId": [1, 2, 3, 4], "title": list("abcd"),
                           "genres": ["Comedy|Action", "(no genres listed)", "Comedy", "Drama|Action|Comedy"]})
    matrix, names = genre_matrix(movies)
    assert names == ["Action", "Comedy", "Drama"]
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 0, 0], [0, 1, 0], [1, 1, 1]])
    assert matrix.dtype == np.float32


def test_loaded_genre_matrix(tiny_movielens: MovieLens):
    data = tiny_movielens
    assert data.genres.shape == (405, len(data.genre_names))
    assert "(no genres listed)" not in data.genre_names
    no_genres = (data.movies["genres"] == "(no genres listed)").to_numpy()
    assert no_genres.sum() >= 1
    assert (data.genres[no_genres] == 0).all()
    assert (data.genres[~no_genres].sum(axis=1) >= 1).all()
    row = int(np.flatnonzero(~no_genres)[0])
    on = {data.genre_names[i] for i in np.flatnonzero(data.genres[row])}
    assert on == set(data.movies.loc[row, "genres"].split("|"))


# ----------------------------------------------------------------------------- batches


def indices_of(batches) -> list[int]:
    return [i for (batch,) in batches for i in batch.tolist()]


def test_epoch_batches_shard_disjointly_across_ranks():
    data = (torch.arange(103),)
    shards = [list(epoch_batches(data, 10, epoch=0, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6  # 51 samples per rank, batches of 10
    first, second = indices_of(shards[0]), indices_of(shards[1])
    assert len(first) == len(second) == 51
    assert not set(first) & set(second)
    covered = set(first) | set(second)
    assert len(covered) == 102 and 103 - len(covered) < 2
    assert [len(b) for (b,) in shards[0]] == [10, 10, 10, 10, 10, 1]


def test_epoch_batches_keep_tensors_aligned():
    users, ratings = torch.arange(50), torch.arange(50) * 10.0
    for batch_users, batch_ratings in epoch_batches((users, ratings), 7, epoch=3, seed=5):
        assert torch.equal(batch_ratings, batch_users * 10.0)


def test_epoch_batches_order_is_seeded_by_seed_and_epoch():
    data = (torch.arange(200),)

    def order(epoch, seed=42):
        return indices_of(epoch_batches(data, 32, epoch=epoch, seed=seed))

    assert order(0) == order(0)
    assert sorted(order(0)) == list(range(200))
    assert order(0) != list(range(200))
    assert order(1) != order(0)
    assert order(0, seed=43) != order(0)


def test_epoch_batches_without_shuffle_keep_order():
    assert indices_of(epoch_batches((torch.arange(25),), 4, epoch=9, seed=1, shuffle=False)) == list(range(25))


def test_ratings_digest_names_the_exact_rows():
    """The digest logged as each split's MLflow dataset input: equal rows give equal digests (whatever their
    array types), any changed value or order another."""
    ratings = Ratings(np.array([0, 1, 1]), np.array([2, 0, 1]), np.array([4.0, 3.5, 5.0]),
                      np.array([10, 11, 12]))
    same = Ratings(*(a.astype(t) for a, t in zip((ratings.user, ratings.movie, ratings.rating, ratings.timestamp),
                                                   (np.int32, np.int32, np.float32, np.int64), strict=True)))
    assert ratings.digest() == same.digest() and len(ratings.digest()) == 32
    changed = Ratings(ratings.user, ratings.movie, np.array([4.0, 3.5, 4.5]), ratings.timestamp)
    assert changed.digest() != ratings.digest()
    assert ratings.take(np.array([1, 0, 2])).digest() != ratings.digest()
