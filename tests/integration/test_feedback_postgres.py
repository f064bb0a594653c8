"""The live ratings store on a real PostgreSQL started for this module: the same checks as on SQLite
(tests/unit/test_feedback_store.py's tests that take the `uri` fixture run here with a database of their own),
then PostgreSQL stopped under an open store (StoreUnavailable within seconds) and started again (the same store
object works)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
from services import Postgres, postgres_server
from unit.test_feedback_store import (  # noqa: F401 (collected here, against PostgreSQL)
    rating,
    store,
    test_a_later_rating_of_the_same_movie_keeps_both,
    test_a_users_ratings_come_oldest_first_and_the_stamp_is_the_latest_seq,
    test_an_event_is_stored_once_and_its_repeats_are_duplicates_that_change_nothing,
    test_an_older_schema_is_migrated_and_a_newer_one_refused,
    test_every_acknowledged_event_survives_a_killed_writer_exactly_once,
    test_new_user_ids_rise_above_the_floor_and_every_earlier_id,
    test_processes_asking_for_new_users_together_never_get_the_same_id,
    test_the_schema_is_created_once_and_the_store_reopens_with_its_data,
    test_writers_in_several_processes_store_each_event_once,
)

from ncf.feedback_store import RatingsStore, StoreUnavailable

DATABASES = itertools.count()


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def uri(postgres: Postgres) -> str:
    """A new database for each test."""
    return postgres.create_database(f"ratings_{next(DATABASES)}")


def test_a_stopped_server_fails_fast_and_the_same_store_works_once_it_is_back(postgres: Postgres, uri: str):
    ratings = RatingsStore(uri)
    assert ratings.add([rating("before")]) == ["stored"]
    postgres.stop()
    try:
        for call in (lambda: ratings.add([rating("while-down")]), lambda: ratings.ratings_of(1),
                     lambda: ratings.new_user(10)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="ratings store postgresql"):
                call()
            assert time.monotonic() - started < 5, "an unreachable store must fail fast"
    finally:
        postgres.start()
    assert ratings.add([rating("after"), rating("before")]) == ["stored", "duplicate"]
    assert [r.event_id for r in ratings.ratings_of(1)] == ["before", "after"]
    ratings.close()
