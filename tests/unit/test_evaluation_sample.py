"""Full ranking over a seeded sample of the users with a relevant held-out movie (`evaluation.users`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncf.baselines import MostPopular, UserItemBias
from ncf.config import Config, EvaluationConfig, load_config, with_values
from ncf.data import MovieLens
from ncf.evaluation import (
    evaluate,
    format_table,
    full_ranking_against,
    next_interactions,
    ranker_of,
    relevant_targets,
    sampled_metrics,
    sampled_users,
    seen_in_training,
)
from ncf.ranking import fit_retriever
from ncf.reranking_search import choose_reranking
from ncf.training.state import build_model
from ncf.training.validation import Validation
from ncf.user_ratings import SeenItems

pytestmark = pytest.mark.unit



def sample(users: int | None, seed: int = 0) -> EvaluationConfig:
    return with_values(load_config(), {"evaluation.users": users, "evaluation.seed": seed}).evaluation


def test_a_sample_is_a_seeded_sorted_subset_of_the_eligible_users(tiny_movielens: MovieLens):
    test = tiny_movielens.splits.test
    eligible, _, _ = relevant_targets(test, sample(None))
    assert len(eligible) > 20
    users, _, _ = relevant_targets(test, sample(20))
    assert len(users) == 20 and np.all(np.diff(users) > 0) and set(users) <= set(eligible)
    np.testing.assert_array_equal(relevant_targets(test, sample(20))[0], users)  # the same seed, the same users
    assert not np.array_equal(relevant_targets(test, sample(20, seed=1))[0], users)


def test_a_sample_keeps_exactly_its_users_relevant_pairs(tiny_movielens: MovieLens):
    test = tiny_movielens.splits.test
    users, rows, movies = relevant_targets(test, sample(20))
    everyone, all_rows, all_movies = relevant_targets(test, sample(None))
    kept = np.isin(everyone[all_rows], users)
    assert sorted(zip(users[rows], movies, strict=True)) == sorted(zip(everyone[all_rows][kept], all_movies[kept],
                                                                       strict=True))


@pytest.mark.parametrize("extra", [0, 1000])
def test_a_sample_of_at_least_every_eligible_user_is_all_of_them(tiny_movielens: MovieLens, extra: int):
    test = tiny_movielens.splits.test
    everyone = relevant_targets(test, sample(None))
    got = relevant_targets(test, sample(len(everyone[0]) + extra))
    for a, b in zip(got, everyone, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sampled_figures_are_the_sampled_users_figures_whatever_the_model(tiny_movielens: MovieLens):
    """Every model ranks the same sampled users (paired figures); each figure is the mean of theirs."""
    fit_on = tiny_movielens.splits.train_and_validation()
    seen, test, n_movies = seen_in_training(tiny_movielens), tiny_movielens.splits.test, tiny_movielens.n_movies
    picked = np.isin(relevant_targets(test, sample(None))[0], relevant_targets(test, sample(25, seed=3))[0])
    for model in (MostPopular(), UserItemBias()):
        rank = ranker_of(model.fit(fit_on, tiny_movielens.n_users, n_movies))
        summary, per_user = full_ranking_against(rank, seen, test, n_movies, evaluation=sample(25, seed=3))
        _, everyones = full_ranking_against(rank, seen, test, n_movies, evaluation=sample(None))
        assert summary["full_users"] == 25 and len(per_user["full_ndcg_at_10"]) == 25
        np.testing.assert_allclose(per_user["full_ndcg_at_10"], everyones["full_ndcg_at_10"][picked])
        assert summary["full_ndcg_at_10"] == pytest.approx(everyones["full_ndcg_at_10"][picked].mean())
        assert evaluate(model, tiny_movielens, evaluation=sample(25, seed=3))["full_users"] == 25


def test_validation_and_the_reranking_choice_rank_the_sample(tiny_config: Config, tiny_movielens: MovieLens):
    config = load_config([f"data.dir={tiny_config.data.dir}", "evaluation.users=15"], preset="tiny")
    torch.manual_seed(0)
    model = build_model(config, tiny_movielens).eval()
    figures = Validation(config, tiny_movielens, rank=0)(model)
    assert figures["val_full_users"] == 15
    everyone = load_config([f"data.dir={tiny_config.data.dir}"], preset="tiny")
    eligible = len(relevant_targets(tiny_movielens.splits.validation, sample(None))[0])
    assert Validation(everyone, tiny_movielens, rank=0)(model)["val_full_users"] == eligible > 15
    train = tiny_movielens.splits.train
    retriever = fit_retriever(config.retrieval, train, tiny_movielens.n_users, tiny_movielens.n_movies)
    seen = SeenItems(train.user, train.movie, tiny_movielens.n_users)  # what the retriever was fitted on
    _, metrics, grid = choose_reranking(model, retriever, seen, tiny_movielens.splits.validation,
                                        tiny_movielens.n_movies, config.retrieval, evaluation=config.evaluation)
    assert metrics["full_users"] == 15 and {row["full_users"] for row in grid} == {15}


def test_the_metric_table_shows_how_many_users_were_ranked():
    text = format_table({"ease": {"full_ndcg_at_10": 0.125, "full_users": 2500.0}, "global_mean": {"rmse": 1.0}})
    header, ease, global_mean = text.splitlines()
    assert "users ranked" in header
    column = 7  # after the name and six full-ranking figures
    assert ease.split()[column] == "2500" and global_mean.split()[column] == "-"


def test_the_sampled_protocol_ranks_the_sample_of_its_users(tiny_movielens):
    """The paper's protocol over a sample: the figures of exactly the sampled users' next interactions."""
    users, _ = next_interactions(tiny_movielens)
    twelve = sample(12, seed=3)
    chosen = set(sampled_users(users, twelve).tolist())
    asked: list[np.ndarray] = []

    def score_pairs(batch_users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        asked.append(batch_users)
        return np.random.default_rng(0).random(candidates.shape)

    figures = sampled_metrics(score_pairs, tiny_movielens, sample=twelve)
    assert set(np.concatenate(asked).tolist()) == chosen and len(chosen) == 12
    assert 0 <= figures["sampled_ndcg_at_10"] <= figures["sampled_hr_at_10"] <= 1
