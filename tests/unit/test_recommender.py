"""The Recommender in raw MovieLens ids: top-k over unseen movies, unknown ids, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ncf.config import load_config
from ncf.config_migration import ADDED_KEYS
from ncf.data import MovieLens
from ncf.ranking import Reranking, fit_retriever, top_k_unseen
from ncf.recommender import PAIR_COLUMNS, RERANKING, TOP_K_COLUMNS, Recommender, UnknownIdError
from ncf.training.state import build_model


@pytest.fixture(scope="module")
def recommender(tiny_movielens: MovieLens) -> Recommender:
    """An untrained model with both options on: the ranking plumbing does not need a good model."""
    config = load_config(["model.use_bias=true", "model.use_genres=true"], preset="tiny")
    torch.manual_seed(0)
    model = build_model(config, tiny_movielens)
    with torch.no_grad():
        model.movie_bias.weight.normal_()  # spread the scores so the ranking is not all ties
    return Recommender.from_training(model, config, tiny_movielens)


def test_recommend_ranks_unseen_movies(recommender: Recommender, tiny_movielens: MovieLens):
    user_id = int(tiny_movielens.ids.user_ids[3])
    top = recommender.recommend([user_id], k=7)
    assert list(top.columns) == TOP_K_COLUMNS
    assert top["rank"].tolist() == list(range(1, 8))
    assert (top["user_id"] == user_id).all()
    seen = tiny_movielens.splits.train_and_validation()
    seen_ids = set(tiny_movielens.ids.movie_ids[seen.movie[seen.user == 3]].tolist())
    assert len(seen_ids) > 7
    assert not seen_ids & set(top["movie_id"].tolist())
    assert top["movie_id"].is_unique
    # Served as retrieval then re-ranking: the recommender's own top-k, which never repeats a seen movie.
    movies, scores = recommender.top_k(np.array([3]), 7)
    assert top["movie_id"].tolist() == tiny_movielens.ids.movie_ids[movies[0]].tolist()
    assert (np.diff(scores[0]) <= 0).all()  # best first
    titles = dict(zip(tiny_movielens.movies["movieId"], tiny_movielens.movies["title"], strict=True))
    assert top["title"].tolist() == [titles[m] for m in top["movie_id"]]


def test_predict_pairs_and_unknown_ids(recommender: Recommender, tiny_movielens: MovieLens):
    user_id = int(tiny_movielens.ids.user_ids[0])
    first, last = int(tiny_movielens.ids.movie_ids[0]), int(tiny_movielens.ids.movie_ids[-1])
    pairs = recommender.predict_pairs([user_id, user_id], [first, last])
    assert list(pairs.columns) == PAIR_COLUMNS
    assert pairs["movie_id"].tolist() == [first, last]
    assert ((pairs["predicted_rating"] >= 0.5) & (pairs["predicted_rating"] <= 5.0)).all()
    np.testing.assert_allclose(pairs["user_weight"] + pairs["movie_weight"], 1.0, atol=1e-6)
    with pytest.raises(UnknownIdError, match="99999"):
        recommender.predict_pairs([99999], [first])
    with pytest.raises(UnknownIdError, match="424242"):
        recommender.predict_pairs([user_id], [424242])
    with pytest.raises(UnknownIdError):
        recommender.recommend([user_id, 99999])
    assert recommender.user_index(user_id) == 0 and recommender.user_index(99999) is None
    # The one-id lookup /recommend uses agrees with the vectorised one on every known user.
    ids = recommender.ids.user_ids
    assert [recommender.user_index(u) for u in ids.tolist()] == recommender.user_indices(ids).tolist()
    assert recommender.user_index(np.int64(ids[-1])) == len(ids) - 1


def test_popular_is_ordered_by_known_ratings(recommender: Recommender, tiny_movielens: MovieLens):
    counts = np.bincount(tiny_movielens.splits.train_and_validation().movie, minlength=tiny_movielens.n_movies)
    top = recommender.popular(5)
    assert len(top) == 5
    assert (np.diff(counts[top]) <= 0).all()
    assert counts[top[-1]] >= np.sort(counts)[-5]


def test_save_and_load_round_trip(recommender: Recommender, tiny_movielens: MovieLens, tmp_path: Path):
    loaded = Recommender.load(recommender.save(tmp_path / "model"))
    assert loaded.config == recommender.config
    np.testing.assert_array_equal(loaded.ids.movie_ids, recommender.ids.movie_ids)
    np.testing.assert_array_equal(loaded.ids.user_ids, recommender.ids.user_ids)
    assert loaded.movies["title"].tolist() == recommender.movies["title"].tolist()
    torch.testing.assert_close(loaded.model.genres, recommender.model.genres)
    user_ids = tiny_movielens.ids.user_ids[:4]
    before, after = recommender.recommend(user_ids, k=5), loaded.recommend(user_ids, k=5)
    assert after["movie_id"].tolist() == before["movie_id"].tolist()
    np.testing.assert_allclose(after["predicted_rating"], before["predicted_rating"], atol=1e-6)


def test_indexes_built_once_for_serving(recommender: Recommender, tiny_movielens: MovieLens):
    """Ratings by user, popularity, means, genres and title search: what the HTTP service answers from."""
    known = tiny_movielens.splits.train_and_validation()
    per_user = np.bincount(known.user, minlength=tiny_movielens.n_users)
    np.testing.assert_array_equal(recommender.ratings_per_user(), per_user)
    rated = recommender.ratings_of(3)
    assert sorted(rated.movie.tolist()) == sorted(known.movie[known.user == 3].tolist())
    assert set(rated.user.tolist()) == {3}
    movie = int(rated.movie[0])
    assert recommender.movie_means[movie] == pytest.approx(known.rating[known.movie == movie].mean())
    no_genres = int(np.flatnonzero(tiny_movielens.movies["genres"] == "(no genres listed)")[0])
    assert recommender.genre_lists[no_genres] == []
    found = recommender.search_titles("BIG, BOLD", limit=50)
    assert len(found) > 0
    assert all("big, bold" in recommender.titles[m].lower() for m in found)
    assert (np.diff(recommender.popularity[found]) <= 0).all()  # most rated first
    assert len(recommender.search_titles("no such title", limit=5)) == 0


@pytest.mark.parametrize("sequence_weight", [0.0, 0.7])
def test_the_retriever_travels_with_the_recommender(tiny_movielens: MovieLens, tmp_path: Path,
                                                    sequence_weight: float):
    """Saved and loaded with its retriever and chosen re-ranking, the recommender ranks the same lists (with the
    sequence signal too: rebuilt from the ratings the recommender keeps, the ones the retriever was fitted on)."""
    config = load_config(["retrieval.n_candidates=20", "retrieval.rating_weight=0.5",
                          f"retrieval.sequence.weight={sequence_weight}"], preset="tiny")
    torch.manual_seed(0)
    model = build_model(config, tiny_movielens)
    retriever = fit_retriever(config.retrieval, tiny_movielens.splits.train_and_validation(),
                              tiny_movielens.n_users, tiny_movielens.n_movies)
    recommender = Recommender.from_training(model, config, tiny_movielens, retriever)
    loaded = Recommender.load(recommender.save(tmp_path))
    assert loaded.candidates is not None and loaded.candidates.name == "ease"
    assert (loaded.candidates.sequence is not None) == (sequence_weight > 0)
    assert loaded.reranking.n_candidates == 20 and loaded.reranking.weights["rating"] == 0.5
    users = np.arange(tiny_movielens.n_users)
    np.testing.assert_array_equal(loaded.top_k(users, 10)[0], recommender.top_k(users, 10)[0])
    # Every list comes from the retriever's candidates: the retriever's top 20 for the first 10 places.
    candidates, _ = top_k_unseen(retriever.score, users, recommender.seen, 20)
    top, _ = recommender.top_k(users, 10)
    assert all(np.isin(top[u], candidates[u]).all() for u in users)


def test_a_model_saved_before_a_config_key_existed_still_loads(recommender: Recommender, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    """Keys added to the model and retrieval sections since a model was registered take their shipped defaults;
    sections added since (evaluation, feedback) are not read by a loaded model."""
    folder = recommender.save(tmp_path / "model")
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    for section, keys in ADDED_KEYS.items():
        for key in keys:
            del saved[section][key]
    del saved["evaluation"], saved["feedback"]
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.setenv("NCF_CONF_DIR", str(tmp_path / "no-conf-here"))  # a registered model's code has no conf/
    loaded = Recommender.load(folder)
    users = np.arange(5)
    np.testing.assert_array_equal(loaded.top_k(users, 10)[0], recommender.top_k(users, 10)[0])


@pytest.fixture(scope="module")
def with_chosen_reranking(tiny_movielens: MovieLens) -> Recommender:
    """A recommender with a retriever whose re-ranking, as if chosen on validation, differs from its config's."""
    config = load_config(["retrieval.n_candidates=20", "retrieval.rating_weight=0.0"], preset="tiny")
    torch.manual_seed(0)
    model = build_model(config, tiny_movielens)
    retriever = fit_retriever(config.retrieval, tiny_movielens.splits.train_and_validation(),
                              tiny_movielens.n_users, tiny_movielens.n_movies)
    chosen = Reranking(12, {"rating": 2.0, "interaction": 0.5})
    return Recommender.from_training(model, config, tiny_movielens, retriever, chosen)


def test_the_chosen_reranking_round_trips_through_its_own_artifact(with_chosen_reranking: Recommender,
                                                                   tmp_path: Path):
    folder = with_chosen_reranking.save(tmp_path / "model")
    saved_config = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved_config["retrieval"]["n_candidates"] == 20  # the config stays the run's input, unchanged
    loaded = Recommender.load(folder)
    assert (folder / RERANKING).is_file()
    assert loaded.reranking == Reranking(12, {"rating": 2.0, "interaction": 0.5}) == with_chosen_reranking.reranking
    users = np.arange(loaded.ids.n_users)
    np.testing.assert_array_equal(loaded.top_k(users, 10)[0], with_chosen_reranking.top_k(users, 10)[0])


def test_a_folder_saved_before_the_reranking_artifact_ranks_as_it_did(with_chosen_reranking: Recommender,
                                                                       tmp_path: Path):
    """Registered models saved before `reranking.json` kept the chosen re-ranking in their config's retrieval
    section; they load with it."""
    folder = with_chosen_reranking.save(tmp_path / "model")
    (folder / RERANKING).unlink()
    users = np.arange(with_chosen_reranking.ids.n_users)
    with_configs = Recommender.load(folder)  # the training config's re-ranking: other lists
    assert (with_configs.top_k(users, 10)[0] != with_chosen_reranking.top_k(users, 10)[0]).any()
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    saved["retrieval"] |= {"n_candidates": 12, "rating_weight": 2.0, "interaction_weight": 0.5}
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    loaded = Recommender.load(folder)
    assert loaded.reranking == with_chosen_reranking.reranking
    np.testing.assert_array_equal(loaded.top_k(users, 10)[0], with_chosen_reranking.top_k(users, 10)[0])
