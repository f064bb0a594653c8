"""The live ratings store on SQLite: idempotent events, user ids never handed out twice, the schema created and
versioned by the code, database failures as StoreUnavailable, and nothing lost or doubled with several processes,
one of them killed mid-write. tests/integration/test_feedback_postgres.py runs the same checks on PostgreSQL
(the tests that take the `uri` fixture)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from unit.test_online_experiment import served

import ncf.feedback_store as feedback_store
from ncf.config import load_config
from ncf.experiment import CHALLENGER, CHAMPION
from ncf.feedback_store import (
    SCHEMA_VERSION,
    RatingEvent,
    RatingsStore,
    StoreUnavailable,
    StoreVersionError,
    feedback_uri,
)


@pytest.fixture
def uri(tmp_path: Path) -> str:
    """A store of its own for each test (the PostgreSQL tests give a new database instead)."""
    return f"sqlite:///{tmp_path / 'feedback' / 'ratings.db'}"


@pytest.fixture
def store(uri: str) -> Iterator[RatingsStore]:
    opened = RatingsStore(uri)
    yield opened
    opened.close()


def rating(event_id: str, user_id: int = 1, movie_id: int = 10, value: float = 4.0, timestamp: int | None = None,
           rec_id: str | None = None) -> RatingEvent:
    return RatingEvent(event_id, user_id, movie_id, value, timestamp, rec_id)


# ----------------------------------------------------------------------------- semantics (shared with PostgreSQL)


def test_an_event_is_stored_once_and_its_repeats_are_duplicates_that_change_nothing(store: RatingsStore):
    before = time.time()
    assert store.add([rating("a", timestamp=100, rec_id="r1"), rating("b", movie_id=11), rating("a", value=1.0)]) \
        == ["stored", "stored", "duplicate"]
    assert store.add([rating("b", value=0.5), rating("c", movie_id=12), rating("a")]) \
        == ["duplicate", "stored", "duplicate"]
    assert store.add([]) == []
    a, b, c = store.ratings()
    assert (a.event_id, a.user_id, a.movie_id, a.rating, a.timestamp, a.rec_id) == ("a", 1, 10, 4.0, 100, "r1")
    assert (b.rating, b.rec_id) == (4.0, None)  # the repeat with another rating changed nothing
    assert before - 1 <= b.timestamp <= time.time() and before <= b.received_at <= time.time()  # no timestamp sent
    assert a.seq < b.seq < c.seq and store.count() == 3


def test_a_later_rating_of_the_same_movie_keeps_both(store: RatingsStore):
    assert store.add([rating("first", movie_id=7, value=2.0)]) == ["stored"]
    assert store.add([rating("again", movie_id=7, value=4.5)]) == ["stored"]
    assert [(r.event_id, r.rating) for r in store.ratings_of(1)] == [("first", 2.0), ("again", 4.5)]


def test_a_users_ratings_come_oldest_first_and_the_stamp_is_the_latest_seq(store: RatingsStore):
    assert store.stamp(5) == 0 and store.ratings_of(5) == []
    store.add([rating("u5-a", user_id=5, movie_id=3), rating("u6-a", user_id=6), rating("u5-b", user_id=5)])
    store.add([rating("u5-c", user_id=5, movie_id=1, timestamp=1)])  # an older event's timestamp: still last
    mine = store.ratings_of(5)
    assert [r.event_id for r in mine] == ["u5-a", "u5-b", "u5-c"]
    assert store.stamp(5) == mine[-1].seq and store.stamp(6) == store.ratings_of(6)[0].seq < mine[-1].seq
    every = store.ratings()
    assert [r.seq for r in every] == sorted(r.seq for r in every) and store.count() == 4
    assert store.ratings(after_seq=every[0].seq, limit=2) == every[1:3]


def test_new_user_ids_rise_above_the_floor_and_every_earlier_id(store: RatingsStore):
    first = store.new_user(610)
    assert first == 611
    assert store.new_user(100) == 612  # a lower floor never hands out an id again
    assert store.new_user(1000) == 1001
    assert store.new_user(0) == 1002
    assert store.registered([611, 612, 613, 1001, 1002, 5]) == {611, 612, 1001, 1002}
    assert store.registered([]) == set()


def test_the_schema_is_created_once_and_the_store_reopens_with_its_data(uri: str):
    store = RatingsStore(uri)
    store.add([rating("kept")])
    user = store.new_user(10)
    store.close()
    again = RatingsStore(uri)
    assert [r.event_id for r in again.ratings()] == ["kept"] and again.registered([user]) == {user}
    assert again.add([rating("kept")]) == ["duplicate"]
    again.close()
    with create_engine(uri).connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_version")).scalars().all() == [SCHEMA_VERSION]


def test_an_older_schema_is_migrated_and_a_newer_one_refused(uri: str, monkeypatch: pytest.MonkeyPatch):
    old = RatingsStore(uri)
    old.add([rating("before")])
    old.close()

    def add_notes(conn) -> None:
        conn.execute(text("CREATE TABLE live_notes (note TEXT)"))

    with monkeypatch.context() as newer_code:
        newer_code.setattr(feedback_store, "MIGRATIONS", [*feedback_store.MIGRATIONS, add_notes])
        newer_code.setattr(feedback_store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
        migrated = RatingsStore(uri)
        assert [r.event_id for r in migrated.ratings()] == ["before"]
        migrated.close()
        RatingsStore(uri).close()  # opened again: nothing left to migrate
    engine = create_engine(uri)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_version")).scalars().all() == [SCHEMA_VERSION + 1]
        assert conn.execute(text("SELECT count(*) FROM live_notes")).scalar() == 0
    engine.dispose()
    with pytest.raises(StoreVersionError, match=f"schema version {SCHEMA_VERSION + 1}"):
        RatingsStore(uri)


# ----------------------------------------------------------------------------- several processes (shared)

# Each worker waits for the file argv[2] to exist, so they start writing together.
WORKER = """
import json, os, sys, time
from ncf.feedback_store import RatingEvent, RatingsStore
store = RatingsStore(sys.argv[1])
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
"""

# Adds batches of 100 for ever; prints each batch's event ids once add() has returned (acknowledged).
ENDLESS_WRITER = WORKER + """
for batch in range(10**9):
    ids = [f"{batch}-{i}" for i in range(100)]
    store.add([RatingEvent(e, batch % 7 + 1, i + 1, 4.0, None, None) for i, e in enumerate(ids)])
    print(" ".join(ids), flush=True)
"""

# Adds 300 event ids (argv[3] is its offset: workers overlap), in batches of 50 in an order of its own, each
# batch holding one id twice; prints how many it stored.
OVERLAPPING_WRITER = WORKER + """
import random
offset = int(sys.argv[3])
ids = [f"event-{offset + i}" for i in range(300)]
random.Random(offset).shuffle(ids)
stored = 0
for start in range(0, 300, 50):
    batch = ids[start:start + 50] + ids[start:start + 1]
    answers = store.add([RatingEvent(e, 1 + int(e[6:]) % 5, int(e[6:]), 3.0, None, None) for e in batch])
    stored += answers.count("stored")
print(stored)
"""

NEW_USERS = WORKER + """
print(json.dumps([store.new_user(1000) for _ in range(40)]))
"""


def start_workers(code: str, uri: str, go: Path, *args: list[str]) -> list[subprocess.Popen]:
    """One worker process per argument list; they start together once `go` is created."""
    return [subprocess.Popen([sys.executable, "-c", code, uri, str(go), *extra], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for extra in args]


def outputs(workers: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=timeout)
        assert worker.returncode == 0, err[-2000:]
        results.append(out)
    return results


def test_every_acknowledged_event_survives_a_killed_writer_exactly_once(uri: str, tmp_path: Path):
    RatingsStore(uri).close()  # the schema exists before the writer starts
    go = tmp_path / "go"
    go.touch()
    writer, = start_workers(ENDLESS_WRITER, uri, go, [])
    acknowledged: list[str] = []
    try:
        while len(acknowledged) < 20 * 100:
            line = writer.stdout.readline()
            assert line.endswith("\n"), f"the writer stopped: {writer.stderr.read()[-2000:]}"
            acknowledged += line.split()
    finally:
        writer.send_signal(signal.SIGKILL)
        rest, _ = writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    acknowledged += [e for line in rest.splitlines(keepends=True) if line.endswith("\n") for e in line.split()]
    store = RatingsStore(uri)
    held = [r.event_id for r in store.ratings()]
    assert set(acknowledged) <= set(held), "an acknowledged event was lost"
    assert len(held) == len(set(held)) == store.count(), "an event was stored twice"
    assert len(held) % 100 == 0, "a batch was stored in part"  # each add() is one transaction
    assert store.add([rating(acknowledged[0])]) == ["duplicate"]
    store.close()


def test_writers_in_several_processes_store_each_event_once(uri: str, tmp_path: Path):
    RatingsStore(uri).close()
    go = tmp_path / "go"
    workers = start_workers(OVERLAPPING_WRITER, uri, go, ["0"], ["100"], ["200"])
    go.touch()
    stored = [int(out) for out in outputs(workers)]
    store = RatingsStore(uri)
    held = [r.event_id for r in store.ratings()]
    assert sorted(held) == sorted(f"event-{i}" for i in range(500)), "each of the 500 ids, once"
    assert sum(stored) == store.count() == 500
    store.close()


def test_processes_asking_for_new_users_together_never_get_the_same_id(uri: str, tmp_path: Path):
    RatingsStore(uri).close()
    go = tmp_path / "go"
    workers = start_workers(NEW_USERS, uri, go, [], [])
    go.touch()
    given = [user for out in outputs(workers) for user in json.loads(out)]
    assert len(given) == len(set(given)) == 80 and min(given) == 1001
    store = RatingsStore(uri)
    assert store.registered(given) == set(given) and store.new_user(0) == max(given) + 1
    store.close()


# ----------------------------------------------------------------------------- SQLite and the config


def test_a_relative_sqlite_uri_is_made_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    store = RatingsStore(load_config().feedback.uri)  # the default: sqlite:///feedback/ratings.db
    store.add([rating("here")])
    store.close()
    assert (tmp_path / "feedback" / "ratings.db").is_file()
    with create_engine(load_config().feedback.uri).connect() as conn:  # WAL: readers never block the writer
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_an_unreachable_store_raises_store_unavailable(tmp_path: Path):
    (tmp_path / "a-folder.db").mkdir()
    with pytest.raises(StoreUnavailable, match="unable to open database file"):
        RatingsStore(f"sqlite:///{tmp_path / 'a-folder.db'}")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreUnavailable, match="ratings store"):
        RatingsStore(f"sqlite:///{tmp_path / 'a-file' / 'ratings.db'}")  # its folder cannot be made


def test_a_store_whose_file_goes_away_raises_store_unavailable_and_recovers(tmp_path: Path):
    folder = tmp_path / "feedback"
    store = RatingsStore(f"sqlite:///{folder / 'ratings.db'}")
    store.add([rating("one")])
    store.close()  # no open connection keeps the old file
    folder.rename(tmp_path / "moved")
    folder.write_text("")  # a file where the folder was: the database cannot be opened
    with pytest.raises(StoreUnavailable):
        store.add([rating("two")])
    with pytest.raises(StoreUnavailable):
        store.ratings_of(1)
    folder.unlink()
    (tmp_path / "moved").rename(folder)
    assert store.add([rating("two")]) == ["stored"] and store.count() == 2
    store.close()


def test_the_environment_overrides_the_configured_uri(monkeypatch: pytest.MonkeyPatch):
    config = load_config().feedback
    monkeypatch.delenv(feedback_store.ENV_URI, raising=False)
    assert feedback_uri(config) == config.uri == "sqlite:///feedback/ratings.db"
    monkeypatch.setenv(feedback_store.ENV_URI, "postgresql+psycopg://ncf@127.0.0.1:5432/ncf_feedback")
    assert feedback_uri(config) == "postgresql+psycopg://ncf@127.0.0.1:5432/ncf_feedback"


def test_a_uri_that_names_no_supported_database_is_refused():
    with pytest.raises(ValueError, match="not a database URL"):
        RatingsStore("ratings.db")
    with pytest.raises(ValueError, match="neither SQLite nor PostgreSQL"):
        RatingsStore("mysql://ncf@127.0.0.1/ratings")


def test_the_store_keeps_each_served_list_once_and_finds_the_ratings_posted_with_them(store: RatingsStore):
    """The lists an experiment served, kept once each, and the ratings posted with their rec_ids."""
    first = [served("3.1.0.10", CHAMPION, 1, (10, 11)), served("4.1.0.10", CHALLENGER, 1, (10,), shown="3.1.0.10")]
    assert store.add_served_lists(first) == 2
    assert store.add_served_lists([served("3.1.0.10", CHAMPION, 1, (10, 11), at=2000.0),
                                   served("3.2.0.10", CHAMPION, 2, (12,))]) == 1  # a repeat stays as first recorded
    assert store.add_served_lists([]) == 0
    assert store.served_lists("3-vs-4") == [first[0], served("3.2.0.10", CHAMPION, 2, (12,)), first[1]]
    assert store.served_lists("other") == []
    store.add([RatingEvent("a", 1, 10, 5.0, None, "3.1.0.10"), RatingEvent("b", 2, 12, 3.0, None, "3.2.0.10"),
               RatingEvent("c", 1, 11, 3.0, None, "9.9.9.9"), RatingEvent("d", 1, 11, 3.0, None, None)])
    assert [r.event_id for r in store.ratings_for_lists("3-vs-4")] == ["a", "b"]
    assert store.claim("3-vs-4", 7) and not store.claim("3-vs-4", 7) and store.claim("3-vs-4", 8)
    assert store.claim("4-vs-5", 7)
