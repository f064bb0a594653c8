"""The live ratings store on a real PostgreSQL started for this module: the same checks as on SQLite
(tests/unit/test_feedback_store.py's tests that take the `uri` fixture run here with a database of their own),
then PostgreSQL stopped under an open store (StoreUnavailable within seconds) and started again (the same store
object works), also under `make serve` over HTTP (503 with Retry-After meanwhile)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

import httpx
import pytest
from services import Postgres, postgres_server, serve_process
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
    test_the_store_keeps_each_served_list_once_and_finds_the_ratings_posted_with_them,
    test_writers_in_several_processes_store_each_event_once,
)

from ncf.feedback_store import RatingsStore, StoreUnavailable
from ncf.ports import free_port

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


def test_over_http_the_api_answers_503_while_the_store_is_down_and_recovers(postgres: Postgres, model_store):
    """`make serve` on a PostgreSQL ratings store: while PostgreSQL is down, writes and the reads that need a user's
    live ratings answer 503 with Retry-After and acknowledge nothing; once it is back, everything acknowledged
    before is there and the same request succeeds."""
    env = os.environ | {"MLFLOW_TRACKING_URI": model_store.uri, "NCF_FEEDBACK_URI": postgres.create_database("api")}
    port = free_port()
    with serve_process(port, env, "serve.warm_users=0"), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                                                       timeout=60) as http:
        top = http.get("/recommend", params={"user_id": 21}).json()["items"][0]["movie_id"]
        body = {"ratings": [{"event_id": "kept", "user_id": 21, "movie_id": top, "rating": 4.0}]}
        assert http.post("/ratings", json=body).json()["results"][0]["status"] == "stored"
        retried = {"ratings": [{"event_id": "retried", "user_id": 21, "movie_id": 1, "rating": 3.0}]}
        postgres.stop()
        try:
            for method, path, kwargs in (("POST", "/ratings", {"json": retried}), ("POST", "/users", {}),
                                         ("GET", "/recommend", {"params": {"user_id": 21}}),
                                         ("GET", "/users/21/history", {})):
                answer = http.request(method, path, **kwargs)
                assert answer.status_code == 503, (path, answer.text)
                assert int(answer.headers["retry-after"]) > 0 and "ratings store" in answer.json()["error"]
        finally:
            postgres.start()
        assert http.post("/ratings", json=retried).json()["results"][0]["status"] == "stored"
        assert top not in [i["movie_id"] for i in http.get("/recommend", params={"user_id": 21}).json()["items"]]
        live = [(r["movie_id"], r["rating"]) for r in http.get("/users/21/history").json()["ratings"]
                if r["source"] == "live"]
        assert sorted(live) == sorted([(top, 4.0), (1, 3.0)])
