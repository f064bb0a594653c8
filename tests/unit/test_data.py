"""Data: schema validation, verified loading, the exact split protocols, ids, genres, batches (on the tiny
synthetic dataset; the figures of the real data are checked in tests/integration/test_real_data.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ncf.config import Config
from ncf.data import (
    DataError,
    IdMaps,
    MovieLens,
    Ratings,
    encode_movielens,
    epoch_batches,
    genre_matrix,
    load_movielens,
    split_ratings,
    validate_ratings,
)

# ----------------------------------------------------------------------------- schema


def ratings_frame(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    """A ratings frame of strings, as `pd.read_csv(dtype=str)` gives it."""
    return pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"], dtype=str)


GOOD_ROWS = [("1", "10", "4.0", "964982703"), ("1", "20", "0.5", "964982704"), ("2", "10", "5", "964982705")]


def test_valid_ratings_are_typed():
    typed = validate_ratings(ratings_frame(GOOD_ROWS))
    assert typed["userId"].tolist() == [1, 1, 2]
    assert typed["movieId"].tolist() == [10, 20, 10]
    assert typed["rating"].tolist() == [4.0, 0.5, 5.0]
    assert typed["timestamp"].tolist() == [964982703, 964982704, 964982705]
    assert typed["userId"].dtype == np.int64 and typed["rating"].dtype == np.float64


@pytest.mark.parametrize(("bad_row", "what"), [
    (("u7", "20", "4.0", "964982704"), "non-integer userId"),
    (("1.5", "20", "4.0", "964982704"), "non-integer userId"),
    (("1", "", "4.0", "964982704"), "non-integer movieId"),
    (("1", "20", "3.7", "964982704"), "rating not in"),
    (("1", "20", "6.0", "964982704"), "rating not in"),
    (("1", "20", "0", "964982704"), "rating not in"),
    (("1", "20", "four", "964982704"), "rating not in"),
    (("1", "20", "4.0", "9649827x4"), "non-integer timestamp"),
    (("1", "20", "4.0", "964982704.5"), "non-integer timestamp"),
])
def test_invalid_row_is_named_by_line(bad_row, what):
    rows = list(GOOD_ROWS)
    rows[1] = bad_row  # data row 2 = line 3 of the file, after the header
    with pytest.raises(DataError, match=what) as err:
        validate_ratings(ratings_frame(rows))
    message = str(err.value)
    assert "line 3:" in message
    assert "line 2:" not in message and "line 4:" not in message
    assert "ratings.csv" in message


def test_duplicate_user_movie_is_named_by_line():
    rows = [*GOOD_ROWS, ("1", "10", "3.0", "964982800")]  # repeats (1, 10) of line 2, at line 5
    with pytest.raises(DataError, match="duplicate") as err:
        validate_ratings(ratings_frame(rows))
    assert "line 5:" in str(err.value)
    assert "line 2:" not in str(err.value)


def test_many_bad_rows_are_counted():
    rows = [("1", str(m), "9.0", "964982703") for m in range(8)]
    with pytest.raises(DataError, match=r"8 row\(s\)") as err:
        validate_ratings(ratings_frame(rows))
    assert "and 3 more" in str(err.value)


def test_ratings_of_movies_missing_from_movies_csv_are_refused(config: Config):
    raw = validate_ratings(ratings_frame(GOOD_ROWS))
    movies = pd.DataFrame({"movieId": [10], "title": ["A (1990)"], "genres": ["Drama"]})
    with pytest.raises(DataError, match=r"absent from movies.csv.*20"):
        encode_movielens(raw, movies, config.data.split)


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
    with pytest.raises(DataError, match="ratings.csv is corrupt"):
        load_movielens(tiny_config.data, folder)


def test_missing_movies_file_is_refused(tiny_dir: Path, tiny_config: Config, tmp_path: Path):
    folder = copy_dataset(tiny_dir, tmp_path / "ml")
    (folder / "movies.csv").unlink()
    with pytest.raises(DataError, match=r"movies\.csv is missing"):
        load_movielens(tiny_config.data, folder)


def test_load_reports_bad_line_of_unchecksummed_files(config: Config, tmp_path: Path):
    """With no checksums configured (custom data), schema errors still name the line."""
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,100\n1,20,4.5x,200\n")
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n10,A (1990),Drama\n20,B (1991),Comedy\n")
    cfg = config.data.model_copy(update={"sha256": {}})
    with pytest.raises(DataError, match="line 3:"):
        load_movielens(cfg, tmp_path)


def test_missing_column_is_refused(config: Config, tmp_path: Path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,score,timestamp\n1,10,4.0,100\n")
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n10,A (1990),Drama\n")
    cfg = config.data.model_copy(update={"sha256": {}})
    with pytest.raises(DataError, match=r"lacks column\(s\) \['rating'\]"):
        load_movielens(cfg, tmp_path)


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
