"""`evaluation.runner: ray_data` on a real local Ray cluster: the test split's full ranking of a fitted recommender
by a pool of Ray Data actors gives exactly the figures of ranking it in the driver."""

from __future__ import annotations

import numpy as np
import pytest

from ncf.config import Config, load_config
from ncf.data import MovieLens
from ncf.evaluation import evaluate_per_user
from ncf.ranking import fit_retriever
from ncf.recommender import Recommender
from ncf.training.loop import train_loop
from ncf.training.reporting import LocalReporter
from ncf.training.validation import Validation
from workflows.publish import served_ranker

pytestmark = pytest.mark.integration

ONE_EPOCH = ["train.max_epochs=1", "train.refit=false"]


@pytest.fixture(scope="module")
def recommender(tiny_config: Config, tiny_movielens: MovieLens) -> Recommender:
    """A one-epoch model with an EASE retriever on the tiny dataset: retrieval and re-ranking, as served."""
    config = load_config([f"data.dir={tiny_config.data.dir}", *ONE_EPOCH], preset="tiny")
    model = train_loop(config, tiny_movielens, LocalReporter(verbose=False),
                       Validation(config, tiny_movielens, rank=0)).model
    retriever = fit_retriever(config.retrieval, tiny_movielens.splits.train_and_validation(), tiny_movielens.n_users,
                              tiny_movielens.n_movies)
    return Recommender.from_training(model, config, tiny_movielens, retriever)


def test_ray_data_runner_ranks_exactly_like_the_driver(local_ray, recommender: Recommender,
                                                       tiny_movielens: MovieLens, capsys: pytest.CaptureFixture):
    # A sample of 40 users in blocks of 7: six blocks, the last one short, on a pool of two actors.
    evaluation = load_config(["evaluation.users=40", "evaluation.runner=ray_data", "evaluation.users_per_block=7",
                              "evaluation.actors=2"]).evaluation
    ranked = {}

    def recorded(name, rank):
        def recording(users, seen, k):
            ranked[name] = (users, rank(users, seen, k))
            return ranked[name][1]
        return recording

    local, local_per_user = evaluate_per_user(recommender, tiny_movielens, evaluation=evaluation,
                                              rank=recorded("local", recommender.rank))
    remote, remote_per_user = evaluate_per_user(recommender, tiny_movielens, evaluation=evaluation,
                                                rank=recorded("ray_data", served_ranker(recommender, evaluation)))

    np.testing.assert_array_equal(ranked["ray_data"][0], ranked["local"][0])
    np.testing.assert_array_equal(ranked["ray_data"][1], ranked["local"][1])  # every user's top 10, in user order
    assert remote == local and local["full_users"] == 40
    assert local_per_user.keys() == remote_per_user.keys()
    for name, values in local_per_user.items():
        np.testing.assert_array_equal(remote_per_user[name], values, err_msg=name)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("full ranking:")]
    assert len(progress) == 6 and progress[-1].startswith("full ranking: 6/6 blocks, 40/40 users")
