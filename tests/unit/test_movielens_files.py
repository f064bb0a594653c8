"""The MovieLens family readers on tiny fixtures in each published format, their validation
(errors name the file and the line), verification, and the synthetic generator."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs import synth
from ncf.config import load_config
from ncf.data import NO_GENRES, DataError, sha256_normalised
from ncf.movielens_files import movies as movies_files
from ncf.movielens_files import ratings as ratings_files
from ncf.movielens_files.ratings import read_dataset, read_fold
from ncf.movielens_files.specs import DATASETS, get_spec
from ncf.movielens_files.verification import verify

pytestmark = pytest.mark.unit

PUBLISHED = load_config().data.datasets  # what GroupLens publishes: archive URL, digests, sizes (conf/data.yaml)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "movielens"
RATINGS_DTYPES = {"userId": np.int32, "movieId": np.int32, "rating": np.float32, "timestamp": np.int64}


def fixture(name: str) -> Path:
    return FIXTURES / name


@pytest.fixture
def copy_of(tmp_path: Path):
    """A writable copy of a fixture folder."""

    def make(name: str) -> Path:
        return Path(shutil.copytree(fixture(name), tmp_path / name))

    return make


def edit_line(path: Path, number: int, text: bytes | None) -> None:
    """Replace line `number` (1-based) of a file; None deletes it."""
    lines = path.read_bytes().split(b"\n")
    if text is None:
        del lines[number - 1]
    else:
        lines[number - 1] = text
    path.write_bytes(b"\n".join(lines))


def reference_ratings(path: Path, sep: str, header: bool) -> pd.DataFrame:
    """The ratings as a naive line-by-line parse sees them: what the fast reader must match."""
    lines = path.read_text().splitlines()[1 if header else 0:]
    rows = [line.split(sep) for line in lines]
    return pd.DataFrame({
        "userId": np.array([r[0] for r in rows], dtype=np.int32),
        "movieId": np.array([r[1] for r in rows], dtype=np.int32),
        "rating": np.array([r[2] for r in rows], dtype=np.float32),
        "timestamp": np.array([r[3] for r in rows], dtype=np.int64),
    })


def read_checked(name: str, ratings_file: str, sep: str, header: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fixture of dataset `name` as `read_dataset` reads it, checked: the types, and the ratings against the
    naive parse of `ratings_file` (`reference_ratings`)."""
    ratings, movies = read_dataset(name, fixture(name))
    assert ratings.dtypes.to_dict() == RATINGS_DTYPES
    assert list(movies.columns) == ["movieId", "title", "genres"]
    assert movies["movieId"].dtype == np.int32
    assert pd.api.types.is_string_dtype(movies["title"]) and pd.api.types.is_string_dtype(movies["genres"])
    assert all(isinstance(t, str) for t in movies["title"]) and all(isinstance(g, str) for g in movies["genres"])
    pd.testing.assert_frame_equal(ratings, reference_ratings(fixture(name) / ratings_file, sep, header))
    return ratings, movies


# ----------------------------------------------------------------------------- registry


def test_config_holds_the_published_archives_digests_and_sizes():
    sizes = {name: (p.sizes.ratings, p.sizes.users, p.sizes.movies) if p.sizes else None
             for name, p in PUBLISHED.items()}
    assert sizes["ml-100k"] == (100_000, 943, 1_682)
    assert sizes["ml-1m"] == (1_000_209, 6_040, 3_883)
    assert sizes["ml-10m"] == (10_000_054, 69_878, 10_681)
    assert sizes["ml-20m"] == (20_000_263, 138_493, 27_278)
    assert sizes["ml-25m"] == (25_000_095, 162_541, 62_423)
    assert sizes["ml-32m"] == (32_000_204, 200_948, 87_585)
    assert sizes["ml-latest-small"] == (100_836, 610, 9_742)
    assert sizes["ml-latest"] is None  # it changes over time
    assert PUBLISHED["ml-10m"].url == "https://files.grouplens.org/datasets/movielens/ml-10m.zip"
    assert PUBLISHED["ml-100k"].sha256["u.data"].startswith("06416e59")
    assert PUBLISHED["ml-100k"].sha256["u.item"].startswith("553841eb")
    assert set(PUBLISHED["ml-latest-small"].sha256) == {"links.csv", "movies.csv", "ratings.csv", "tags.csv"}


def test_every_configured_dataset_has_a_reader_and_back():
    assert set(PUBLISHED) == set(DATASETS)
    assert DATASETS["ml-10m"].archive_folder == "ml-10M100K"
    assert DATASETS["ml-25m"].as_dict()["ratings_file"] == "ratings.csv"
    assert DATASETS["ml-100k"].files("u3") == ["u.data", "u.item", "u.genre", "u3.base", "u3.test"]
    with pytest.raises(DataError, match="unknown MovieLens dataset 'ml-5m'"):
        get_spec("ml-5m")


# ----------------------------------------------------------------------------- parsers


def test_ml_100k_parses_tabs_latin1_titles_and_genre_flags():
    ratings, movies = read_checked("ml-100k", "u.data", "\t", header=False)
    assert (len(ratings), ratings["userId"].nunique(), len(movies)) == (25, 5, 10)
    assert movies_files.read_100k_genres(fixture("ml-100k") / "u.genre")[:5] == [
        "unknown", "Action", "Adventure", "Animation", "Children's"]
    title = movies.set_index("movieId")["title"]
    genres = movies.set_index("movieId")["genres"]
    assert title[3] == "Café au lait (1993)" and title[4] == "Cité des enfants perdus, La (1995)"
    assert genres[1] == "Animation|Children's|Comedy"
    assert genres[7] == NO_GENRES  # only the "unknown" flag
    assert set(ratings["rating"]) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_ml_1m_parses_double_colons_and_latin1():
    ratings, movies = read_checked("ml-1m", "ratings.dat", "::", header=False)
    assert (len(ratings), ratings["userId"].nunique(), len(movies)) == (20, 4, 8)
    title = movies.set_index("movieId")["title"]
    assert title[21] == "Crème de la Crème (1997)"
    assert title[11] == "American President, The (1995)"
    assert title[3338] == '"Great Performances" Cats (1998)'
    assert title[260] == "Star Wars: Episode IV - A New Hope (1977)"  # a single ':' is not a separator
    assert movies.set_index("movieId")["genres"][1] == "Animation|Children's|Comedy"


def test_ml_10m_parses_utf8_and_half_stars():
    ratings, movies = read_checked("ml-10m", "ratings.dat", "::", header=False)
    assert (len(ratings), len(movies)) == (20, 7)
    assert (ratings["rating"] % 1 == 0.5).any()
    title = movies.set_index("movieId")["title"]
    assert title[4973] == "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)"
    assert title[27721] == "Très bien, merci (2007)"
    assert movies.set_index("movieId")["genres"][8606] == NO_GENRES


def test_ml_25m_csv_parses_quoted_titles():
    ratings, movies = read_checked("ml-25m", "ratings.csv", ",", header=True)
    assert (len(ratings), ratings["userId"].nunique(), len(movies)) == (20, 4, 8)
    title = movies.set_index("movieId")["title"]
    assert title[11] == "American President, The (1995)"
    assert title[26587] == '"Great Performances" Cats (1998)'
    assert title[4973] == "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)"
    assert movies.set_index("movieId")["genres"][209171] == NO_GENRES


def test_crlf_files_read_the_same(copy_of):
    folder = copy_of("ml-1m")
    for name in ("ratings.dat", "movies.dat"):
        (folder / name).write_bytes((folder / name).read_bytes().replace(b"\n", b"\r\n"))
    for got, want in zip(read_dataset("ml-1m", folder), read_dataset("ml-1m", fixture("ml-1m")), strict=True):
        pd.testing.assert_frame_equal(got, want)


@pytest.mark.parametrize("fold", ["u1", "u2", "u3", "u4", "u5", "ua", "ub"])
def test_ml_100k_folds_are_disjoint_and_cover_u_data(fold):
    train, test = read_fold(fixture("ml-100k"), fold)
    assert train.dtypes.to_dict() == RATINGS_DTYPES
    assert (len(train), len(test)) == (20, 5)
    pairs = lambda frame: set(zip(frame["userId"], frame["movieId"], strict=True))  # noqa: E731
    assert not pairs(train) & pairs(test)
    ratings, _ = read_dataset("ml-100k", fixture("ml-100k"))
    assert pairs(train) | pairs(test) == pairs(ratings)
    if fold in ("ua", "ub"):
        assert test["userId"].value_counts().eq(1).all()  # the same number of test ratings per user


def test_ml_100k_u1_to_u5_tests_partition_u_data():
    tests = [read_fold(fixture("ml-100k"), f"u{k}")[1] for k in range(1, 6)]
    keys = pd.concat(tests)[["userId", "movieId"]]
    assert not keys.duplicated().any() and len(keys) == 25
    with pytest.raises(DataError, match="unknown ml-100k fold 'u6'"):
        read_fold(fixture("ml-100k"), "u6")


def test_many_blocks_keep_line_numbers(copy_of, monkeypatch):
    """Ratings are parsed in blocks; line numbers must stay exact across them."""
    monkeypatch.setattr(ratings_files, "BLOCK_BYTES", 64)
    folder = copy_of("ml-25m")
    ratings, _ = read_dataset("ml-25m", folder)
    pd.testing.assert_frame_equal(ratings, read_dataset("ml-25m", fixture("ml-25m"))[0])
    edit_line(folder / "ratings.csv", 19, b"4,11,3.0,notatime")
    with pytest.raises(DataError, match=r"ratings\.csv, line 19: non-integer timestamp 'notatime'"):
        read_dataset("ml-25m", folder)


# ----------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(("name", "file", "line", "text", "problem"), [
    ("ml-100k", "u.data", 3, b"1\t2\t3", "expected 4 fields separated by '\\t', found 3"),
    ("ml-100k", "u.data", 7, b"1\tx\t3\t874965478", "non-integer movieId 'x'"),
    ("ml-100k", "u.item", 4, b"4|Short|01-Jan-1995||url|0|1", "expected 24 fields separated by '|'"),
    ("ml-100k", "u.genre", 2, b"Action", "expected 'name|index'"),
    ("ml-1m", "ratings.dat", 5, b"1::21::3", "expected 4 fields separated by '::', found 3"),
    ("ml-1m", "ratings.dat", 9, b"2::1:3::978300760", "expected 4 fields separated by '::', found 3"),
    ("ml-1m", "movies.dat", 6, b"260::Star Wars", "expected 3 fields separated by '::', found 2"),
    ("ml-10m", "ratings.dat", 7, b"2::abc::4.5::1114074432", "non-integer movieId 'abc'"),
    ("ml-10m", "ratings.dat", 8, b"", "empty line"),
    ("ml-10m", "movies.dat", 2, b"122::Boomerang \xe9 (1992)::Comedy", "not valid utf-8"),
    ("ml-25m", "ratings.csv", 6, b"2,1,2.5", "expected 4 fields separated by ',', found 3"),
    ("ml-25m", "ratings.csv", 1, b"user,movie,rating,timestamp", "expected the header"),
    ("ml-25m", "ratings.csv", 12, b"3,296,four,1153052936", "rating 'four' is not a number"),
    ("ml-25m", "movies.csv", 3, b'296,"Pulp Fiction (1994),Comedy', "malformed CSV"),
    ("ml-25m", "movies.csv", 4, b"x4973,Amelie (2001),Comedy", "non-integer movieId 'x4973'"),
])
def test_malformed_line_names_file_and_line(copy_of, name, file, line, text, problem):
    folder = copy_of(name)
    edit_line(folder / file, line, text)
    with pytest.raises(DataError, match=rf"{re.escape(file)}, line {line}: ") as err:
        read_dataset(name, folder)
    assert str(folder / file) in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize(("name", "file", "line", "text", "scale"), [
    ("ml-100k", "u.data", 2, b"1\t2\t6\t874965478", "whole stars 1-5"),
    ("ml-1m", "ratings.dat", 4, b"1::32::4.5::978300760", "whole stars 1-5"),
    ("ml-10m", "ratings.dat", 3, b"1::4973::0.0::1114074432", "half stars 0.5-5"),
    ("ml-25m", "ratings.csv", 5, b"1,26587,5.5,1150469250", "half stars 0.5-5"),
    ("ml-25m", "ratings.csv", 5, b"1,26587,3.25,1150469250", "half stars 0.5-5"),
])
def test_rating_outside_the_allowed_values(copy_of, name, file, line, text, scale):
    folder = copy_of(name)
    edit_line(folder / file, line, text)
    with pytest.raises(DataError, match=rf"{re.escape(file)}, line {line}: rating .* outside the "
                                        rf"allowed values \({scale}\)"):
        read_dataset(name, folder)


@pytest.mark.parametrize("name", ["ml-1m", "ml-25m"])
def test_duplicate_pair_names_both_lines(copy_of, name):
    spec = DATASETS[name]
    folder = copy_of(name)
    path = folder / spec.ratings_file
    lines = path.read_bytes().rstrip(b"\n").split(b"\n")
    first = 3
    path.write_bytes(b"\n".join([*lines, lines[first - 1]]) + b"\n")
    user, movie = lines[first - 1].replace(b"::", b",").split(b",")[:2]
    with pytest.raises(DataError, match=rf"line {len(lines) + 1}: duplicate \(userId {int(user)}, movieId "
                                        rf"{int(movie)}\), already rated on line {first}"):
        read_dataset(name, folder)


def test_duplicate_movie_and_unknown_movie(copy_of):
    folder = copy_of("ml-25m")
    edit_line(folder / "ratings.csv", 2, b"1,999,4.0,1150463428")
    with pytest.raises(DataError, match=r"ratings\.csv, line 2: movieId 999 is not in movies\.csv"):
        read_dataset("ml-25m", folder)
    edit_line(folder / "movies.csv", 3, b"1,Toy Story again (1995),Comedy")
    with pytest.raises(DataError, match=r"movies\.csv, line 3: duplicate movieId 1, already on line 2"):
        read_dataset("ml-25m", folder)


def test_missing_file(copy_of):
    folder = copy_of("ml-1m")
    (folder / "movies.dat").unlink()
    with pytest.raises(DataError, match=r"movies\.dat is missing"):
        read_dataset("ml-1m", folder)


# ----------------------------------------------------------------------------- verification


def digests(folder: Path, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def test_verify_checks_ml_100k_checksums(copy_of):
    folder = copy_of("ml-100k")
    expected = digests(folder, ["u.data", "u.item"])
    result = verify("ml-100k", folder, sha256=expected, sizes=PUBLISHED["ml-100k"].sizes)
    assert result.sha256 == expected  # the digests cover u.data and u.item: the published sizes are not compared
    assert "SHA-256 of u.data, u.item matched" in result.method
    assert (result.ratings, result.users, result.movies) == (25, 5, 10)
    assert set(result.folds) == {"u1", "u2", "u3", "u4", "u5", "ua", "ub"}

    # The real archive's digests do not match the fixtures.
    with pytest.raises(DataError, match=r"u\.data is corrupt or modified: sha256 .*, expected 06416e59"):
        verify("ml-100k", folder, sha256=PUBLISHED["ml-100k"].sha256)

    # CRLF line endings are normalised away...
    (folder / "u.item").write_bytes((folder / "u.item").read_bytes().replace(b"\n", b"\r\n"))
    verify("ml-100k", folder, sha256=expected)

    # ...but one modified byte is caught, even where it still parses.
    data = bytearray((folder / "u.data").read_bytes())
    data[data.index(b"\t") + 1] ^= 0x01  # a movie id digit changes, e.g. 2 -> 3
    (folder / "u.data").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"u\.data is corrupt or modified"):
        verify("ml-100k", folder, sha256=expected)


def test_streamed_digest_matches_the_normalised_one(tmp_path):
    path = tmp_path / "crlf.txt"
    content = b"a,b\r\n" * 1000 + b"tail\r"
    path.write_bytes(content)
    whole = hashlib.sha256(content.replace(b"\r\n", b"\n")).hexdigest()
    assert sha256_normalised(path, block=7) == whole  # CRLFs straddle the reads


def test_verify_without_checksums_checks_counts():
    with pytest.raises(DataError, match=r"ratings\.csv: 20 ratings, but the published ml-25m has 25,000,095"):
        verify("ml-25m", fixture("ml-25m"), sizes=PUBLISHED["ml-25m"].sizes)
    result = verify("ml-25m", fixture("ml-25m"))
    assert (result.ratings, result.users, result.movies, result.sha256) == (20, 4, 8, {})
    assert "no SHA-256 and no published sizes known" in result.method and "structure only" in result.method


def test_verify_checks_folds(copy_of):
    folder = copy_of("ml-100k")
    test_lines = (folder / "ua.test").read_bytes()
    (folder / "ua.base").write_bytes((folder / "ua.base").read_bytes() + test_lines.split(b"\n")[0] + b"\n")
    with pytest.raises(DataError, match=r"ua\.test shares 1 \(user, movie\) pair"):
        verify("ml-100k", folder)


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_tiny_is_exact_deterministic_and_readable(tmp_path):
    shape = synth.SHAPES["tiny"]
    assert synth.generate("tiny", tmp_path / "a", seed=0, verbose=False) == {
        "ratings": shape.n_ratings, "users": shape.n_users, "movies": shape.n_movies}
    synth.generate("tiny", tmp_path / "b", seed=0, verbose=False)
    synth.generate("tiny", tmp_path / "c", seed=1, verbose=False)
    for name in ("ratings.csv", "movies.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "ratings.csv").read_bytes() != (tmp_path / "c" / "ratings.csv").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["movies.csv", "ratings.csv"]

    result = verify("ml-25m", tmp_path / "a")  # the ml-25m parser reads it, validated
    assert (result.ratings, result.users, result.movies) == (2_000, 50, 200)
    ratings, movies = read_dataset("ml-25m", tmp_path / "a")
    per_user = ratings.groupby("userId").size()
    assert per_user.min() >= 5 and per_user.max() > 2 * per_user.median()  # a skewed activity
    assert set(ratings["rating"]) <= set(np.arange(1, 11) / 2)
    same_user = ratings["userId"].to_numpy()[1:] == ratings["userId"].to_numpy()[:-1]
    stamps = ratings["timestamp"].to_numpy()
    assert (stamps[1:][same_user] > stamps[:-1][same_user]).all()  # each user's ratings in time order
    assert movies["genres"].str.len().gt(0).all() and movies["title"].str.contains(",").any()


def test_synthetic_small_has_popularity_and_signal(tmp_path):
    synth.generate("small", tmp_path, seed=3, verbose=False)
    ratings, movies = read_dataset("ml-25m", tmp_path)
    assert (len(ratings), ratings["userId"].nunique(), len(movies)) == (100_000, 2_000, 3_000)
    per_movie = ratings.groupby("movieId").size()
    assert per_movie.max() > 20 * per_movie.median()  # a long tail of rarely rated movies
    # Signal: user and movie means learnt on 80% predict the other 20% far better than the global mean.
    test = np.random.default_rng(0).random(len(ratings)) < 0.2
    train, held = ratings[~test], ratings[test]
    mean = train["rating"].mean()
    user_bias = (train["rating"] - mean).groupby(train["userId"]).mean()
    movie_bias = (train["rating"] - mean).groupby(train["movieId"]).sum() / (train.groupby("movieId").size() + 5)
    predicted = (mean + held["userId"].map(user_bias).fillna(0) + held["movieId"].map(movie_bias).fillna(0))
    rmse = lambda p: float(np.sqrt(np.mean((p - held["rating"]) ** 2)))  # noqa: E731
    assert rmse(predicted) < 0.93 * rmse(mean)


def test_synthetic_shapes():
    assert synth.SHAPES["ml-25m"] == synth.Shape("ml-25m", 162_541, 62_423, 25_000_095)
    assert synth.SHAPES["ml-32m"] == synth.Shape("ml-32m", 200_948, 87_585, 32_000_204)
    counts = synth._apportion(np.array([1.0, 1.0, 100.0]), total=30, cap=12)
    assert counts.sum() == 30 and counts.max() == 12
    with pytest.raises(ValueError, match="do not fit"):
        synth._world(synth.Shape("bad", 2, 10, 100), np.random.default_rng(0))
