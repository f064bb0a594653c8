"""The real ml-latest-small data: the seed split and reference figures every result is compared against."""

from __future__ import annotations

import numpy as np
import pytest

from ncf.config import Config
from ncf.data import MovieLens, Ratings, split_ratings
from ncf.evaluation import evaluate_baselines


def all_ratings(data: MovieLens) -> Ratings:
    s = data.splits
    return Ratings(*(np.concatenate([getattr(part, f) for part in (s.train, s.validation, s.test)])
                     for f in ("user", "movie", "rating", "timestamp")))


def test_seed_split_sizes(movielens: MovieLens):
    sizes = movielens.splits.sizes()
    assert sizes == {"train": 72_115, "validation": 8_304, "test": 20_417}
    assert len(movielens.splits.train_and_validation()) == 80_419
    assert movielens.n_users == 610


def test_fraction_of_test_on_unseen_movies(movielens: MovieLens):
    s = movielens.splits
    unseen = ~np.isin(s.test.movie, s.train_and_validation().movie)
    assert unseen.mean() == pytest.approx(0.083, abs=0.001)


def test_temporal_and_random_split_sizes(movielens: MovieLens, config: Config):
    ratings = all_ratings(movielens)
    assert len(ratings) == 100_836
    temporal = split_ratings(ratings, config.data.split.model_copy(update={"protocol": "temporal"}))
    assert len(temporal.test) == 100_836 - int(np.floor(0.8 * 100_836))
    random = split_ratings(ratings, config.data.split.model_copy(update={"protocol": "random"}))
    assert len(random.test) == round(0.2 * 100_836)


def test_catalogue_and_genres(movielens: MovieLens):
    assert movielens.n_movies == len(movielens.movies) == 9_742
    assert len(np.unique(all_ratings(movielens).movie)) < 9_742  # some movies are never rated
    toy_story = movielens.ids.movie_index(np.array([1]))[0]
    assert movielens.movies.loc[toy_story, "title"] == "Toy Story (1995)"
    assert {"Drama", "Comedy", "Action", "IMAX"} <= set(movielens.genre_names)
    assert (movielens.movies["genres"] == "(no genres listed)").sum() == 34
    on = {movielens.genre_names[i] for i in np.flatnonzero(movielens.genres[toy_story])}
    assert on == {"Adventure", "Animation", "Children", "Comedy", "Fantasy"}


def test_baselines_reproduce_the_reference_figures(movielens: MovieLens, config: Config):
    table = evaluate_baselines(movielens, evaluation=config.evaluation, retrieval=config.retrieval)
    assert table["global_mean"]["rmse"] == pytest.approx(1.068, abs=0.005)
    assert table["user_item_bias"]["rmse"] == pytest.approx(0.896, abs=0.005)
    assert table["user_item_bias"]["mae"] == pytest.approx(0.690, abs=0.005)
    assert table["most_popular"]["full_ndcg_at_10"] == pytest.approx(0.0754, abs=0.005)
    assert table["most_popular"]["full_hit_rate_at_10"] == pytest.approx(0.32, abs=0.005)
    # The retrievers with the shipped settings (EASE on the 2,000 most rated movies, ALS 64 factors) rank far
    # better than most-popular.
    assert table["ease"]["full_ndcg_at_10"] == pytest.approx(0.126, abs=0.006)
    assert table["als"]["full_ndcg_at_10"] == pytest.approx(0.1265, abs=0.006)
    assert min(table["ease"]["full_ndcg_at_10"], table["als"]["full_ndcg_at_10"]) > 1.5 * table["most_popular"][
        "full_ndcg_at_10"]
