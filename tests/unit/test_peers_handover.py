"""The SASRec peer's hand-over (`workflows.sasrec_fit`, `workflows.peers_sasrec`): the interactions the project
writes for the peers virtualenv, and the top-k lists it reads back, ranked by the project's own code."""

from __future__ import annotations

import numpy as np

from ncf.evaluation import score_ranker
from ncf.user_ratings import SeenItems
from workflows.peers_sasrec import lists_score, request_for
from workflows.retrieval_bench import slices
from workflows.sasrec_fit import Lists, Request, read_lists, read_request, write_lists, write_request


def test_a_request_reads_back_as_written(tmp_path, tiny_movielens, tiny_config):
    validation, _ = slices(tiny_movielens, tiny_config.evaluation)
    request = request_for(validation, (50, 100), seed=2)
    write_request(tmp_path / "request.npz", request)
    back = read_request(tmp_path / "request.npz")
    train = tiny_movielens.splits.train
    assert np.array_equal(back.user, train.user) and np.array_equal(back.movie, train.movie)
    assert np.array_equal(back.timestamp, train.timestamp)
    assert back.epochs == (50, 100) and back.seed == 2 and back.k == 10
    # Only the users the validation slice ranks (a relevant validation rating), sorted.
    relevant = np.unique(tiny_movielens.splits.validation.user[tiny_movielens.splits.validation.rating >= 4.0])
    assert np.array_equal(back.rank_users, relevant)


def test_lists_read_back_are_ranked_as_listed_then_by_popularity(tmp_path, tiny_movielens):
    data = tiny_movielens
    train = data.splits.train
    seen = SeenItems(train.user, train.movie, data.n_users)
    unseen = [np.setdiff1d(np.arange(data.n_movies), seen.of(user)) for user in (0, 1, 2)]
    k = 4
    full = unseen[0][[7, 3, 11, 5]]  # user 0: a whole list, in an order popularity would not give
    short = np.r_[unseen[1][[9, 2]], -1, -1]  # user 1: two movies, then nothing
    written = Lists(np.array([0, 1]), {50: np.vstack([full, short])}, {50: 12.5})
    write_lists(tmp_path / "lists.npz", written)  # as the peers virtualenv writes them
    lists = read_lists(tmp_path / "lists.npz")
    assert lists.seconds == {50: 12.5} and np.array_equal(lists.users, [0, 1])

    rank = score_ranker(lists_score(lists.users, lists.top[50], train, data.n_users, data.n_movies))
    top = rank(np.array([0, 1, 2]), seen, k)
    popularity = np.bincount(train.movie, minlength=data.n_movies)

    def most_rated(user: int, exclude: np.ndarray, n: int) -> set[int]:
        left = np.setdiff1d(unseen[user], exclude)
        return set(left[np.argsort(-popularity[left], kind="stable")][:n].tolist())

    assert np.array_equal(top[0], full)
    assert np.array_equal(top[1][:2], short[:2])
    # The end of a short list and a user without one: the most rated movies they have not seen (ties any order).
    assert popularity[top[1][2:]].tolist() == sorted(popularity[list(most_rated(1, short[:2], 2))], reverse=True)
    assert popularity[top[2]].tolist() == sorted(popularity[list(most_rated(2, np.empty(0, int), k))], reverse=True)
    assert not any(np.isin(top[user], seen.of(user)).any() for user in (0, 1, 2))


def test_a_request_round_trips_with_empty_fields(tmp_path):
    request = Request(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.array([3]), 10,
                      (1,), 0)
    write_request(tmp_path / "r.npz", request)
    back = read_request(tmp_path / "r.npz")
    assert len(back.user) == 0 and back.rank_users.tolist() == [3] and back.epochs == (1,)
