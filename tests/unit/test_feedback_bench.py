"""The feedback benchmark's bookkeeping (workflows.feedback_bench): which ratings it replays in which order, how it
reads POST /ratings answers, and how it compares the store with what was acknowledged."""

from __future__ import annotations

import json

import numpy as np

from ncf.data import MovieLens
from workflows.feedback_bench import Ledger, StoreCheck, ratings_to_replay


def test_the_replay_is_each_users_test_ratings_oldest_first(tiny_movielens: MovieLens):
    users = ratings_to_replay(tiny_movielens)
    test = tiny_movielens.splits.test
    assert sum(map(len, users)) == len(test)
    assert len(users) == len(np.unique(test.user))
    for ratings in users:
        assert len({r.user_id for r in ratings}) == 1
        assert [r.timestamp for r in ratings] == sorted(r.timestamp for r in ratings)
    # the raw ids: every replayed pair is a test rating of the dataset
    pairs = {(int(tiny_movielens.ids.user_ids[u]), int(tiny_movielens.ids.movie_ids[m]))
             for u, m in zip(test.user, test.movie, strict=True)}
    assert {(r.user_id, r.movie_id) for ratings in users for r in ratings} == pairs


def test_a_sample_of_users_is_the_same_each_run(tiny_movielens: MovieLens):
    first, again = ratings_to_replay(tiny_movielens, users=5, seed=3), ratings_to_replay(tiny_movielens, 5, 3)
    assert len(first) == 5 and first == again
    assert len(ratings_to_replay(tiny_movielens, users=10_000)) == len(ratings_to_replay(tiny_movielens))


def answer(*results: tuple[str, str, str | None]) -> bytes:
    return json.dumps({"results": [{"event_id": e, "status": s, "reason": r} for e, s, r in results]}).encode()


def test_the_ledger_keeps_only_what_was_acknowledged():
    ledger = Ledger()
    statuses = ledger.record(["a", "b", "c"], 200, answer(("a", "stored", None), ("b", "duplicate", None),
                                                          ("c", "rejected", "unknown movie 7")))
    assert statuses == ["stored", "duplicate", "rejected"]
    assert ledger.record(["d", "e"], 503, b'{"detail": "down"}') == ["failed", "failed"]
    assert ledger.record(["f"], 0, b"") == ["failed"]
    assert ledger.acknowledged == ["a"]
    assert (ledger.duplicates, dict(ledger.rejected), ledger.failed) == (1, {"unknown movie 7": 1}, 3)


def test_the_store_check_counts_lost_duplicated_and_unacknowledged_events():
    ledger = Ledger(acknowledged=["a", "b", "c"])
    assert StoreCheck.of(ledger, ["a", "b", "c"]) == StoreCheck(held=3, lost=0, duplicated=0, unacknowledged=0)
    # "c" acknowledged but missing, "a" held twice, "x" committed by a post whose answer never came
    assert StoreCheck.of(ledger, ["a", "a", "b", "x"]) == StoreCheck(held=4, lost=1, duplicated=1, unacknowledged=1)
