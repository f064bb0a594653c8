"""Shared fixtures: the real MovieLens folder (from NCF_DATA_DIR) and the data built from it."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from ncf.config import REPO_ROOT, Config, load_config
from ncf.data import MovieLens, encode_movielens, load_movielens, validate_movies, validate_ratings

DATA_FILES = ("links.csv", "movies.csv", "ratings.csv", "tags.csv")


def _resolve_data_dir(value: str) -> Path:
    """NCF_DATA_DIR as given; a relative path is taken from the working directory, else the repo root."""
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    return path.resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real ml-latest-small folder; tests that need it are skipped when NCF_DATA_DIR is unset."""
    value = os.environ.get("NCF_DATA_DIR")
    if not value:
        pytest.skip("NCF_DATA_DIR is not set: point it at the ml-latest-small folder "
                    "(CI: NCF_DATA_DIR=../shared/datasets/ml-latest-small) to run the real-data tests")
    folder = _resolve_data_dir(value)
    missing = [name for name in DATA_FILES if not (folder / name).is_file()]
    if missing:
        pytest.fail(f"NCF_DATA_DIR={value!r} resolves to {folder}, which lacks {missing}")
    return folder


@pytest.fixture(scope="session")
def config() -> Config:
    """The default configuration from conf/."""
    return load_config()


@pytest.fixture(scope="session")
def movielens(data_dir: Path, config: Config) -> MovieLens:
    """The real data, verified, encoded and split with the default (seed) protocol."""
    return load_movielens(config.data, data_dir)


@pytest.fixture(scope="session")
def raw_frames(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The validated (ratings, movies) frames of the real data, before encoding."""
    read = {"dtype": str, "keep_default_na": False}
    ratings = validate_ratings(pd.read_csv(data_dir / "ratings.csv", **read))
    movies = validate_movies(pd.read_csv(data_dir / "movies.csv", **read))
    return ratings, movies


@pytest.fixture(scope="session")
def small_movielens(raw_frames: tuple[pd.DataFrame, pd.DataFrame], config: Config) -> MovieLens:
    """The ratings of the first 60 users (about 8,750), over the whole movie catalogue: fast to train on."""
    ratings, movies = raw_frames
    first_users = ratings["userId"].drop_duplicates().sort_values().iloc[:60]
    subset = ratings[ratings["userId"].isin(first_users)].reset_index(drop=True)
    return encode_movielens(subset, movies, config.data.split)
