"""The durable store of live ratings: what people rate through the API, kept in a real database.

Also the lists served during an online experiment (`served_lists`, `ncf.experiment`), which ratings are attributed
to, and the periods a process claimed for experiment work (`claim`).

An embedded SQLite file by default (`feedback.uri`, overridden by env NCF_FEEDBACK_URI), PostgreSQL through the
same code when the URI says so; SQLAlchemy Core, no ORM. The code creates and versions the schema
(`SCHEMA_VERSION`, `MIGRATIONS`); nobody edits it by hand. Every method is one transaction, committed before it
returns, and safe with several processes on one store: events are idempotent by `event_id`, user ids come from
one counter. Any database failure surfaces as `StoreUnavailable` (the API answers 503 and acknowledges nothing);
the same object works again once the database is back.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from ncf.experiment import ServedList

if TYPE_CHECKING:
    from ncf.config import FeedbackConfig  # an annotation only: the store imports without the config's schema

ENV_URI = "NCF_FEEDBACK_URI"
SQLITE_BUSY_TIMEOUT_MS = 30_000  # writers of other processes wait this long for the file's write lock
POSTGRES_CONNECT_TIMEOUT_S = 3  # an unreachable server fails fast rather than hanging a request
SCHEMA_LOCK = 0x6E6366  # PostgreSQL advisory lock id serialising schema creation across processes ("ncf")


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or failed the statement (the API answers 503)."""


class StoreVersionError(RuntimeError):
    """The store's schema is newer than this code."""


@dataclass(frozen=True)
class RatingEvent:
    """A rating as a client posts it; `event_id` makes retries idempotent, `rec_id` names the /recommend answer."""

    event_id: str
    user_id: int
    movie_id: int
    rating: float
    timestamp: int | None
    rec_id: str | None


@dataclass(frozen=True)
class LiveRating:
    """A stored rating. `seq` orders the store (assigned on insert); `timestamp` is the event's own (unix
    seconds), or the time the store received it when the client sent none."""

    seq: int
    event_id: str
    user_id: int
    movie_id: int
    rating: float
    timestamp: int
    rec_id: str | None
    received_at: float


def feedback_uri(config: FeedbackConfig) -> str:
    """The store's URI: env NCF_FEEDBACK_URI when set, else `feedback.uri`."""
    return os.environ.get(ENV_URI) or config.uri


# ----------------------------------------------------------------------------- schema

metadata = MetaData()
schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))
live_ratings = Table(
    "live_ratings", metadata,
    # INTEGER on SQLite, so the column is the rowid; AUTOINCREMENT: a seq is never handed out twice.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("event_id", Text, nullable=False, unique=True),
    Column("user_id", BigInteger, nullable=False),
    Column("movie_id", BigInteger, nullable=False),
    Column("rating", Float, nullable=False),
    Column("timestamp", BigInteger, nullable=False),
    Column("rec_id", Text, nullable=True),
    Column("received_at", Float, nullable=False),
    Index("ix_live_ratings_user_seq", "user_id", "seq"),  # ratings_of and stamp: one index range each
    sqlite_autoincrement=True,
)
live_users = Table(
    "live_users", metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("created_at", Float, nullable=False),
)


# The lists served during an online experiment (ncf.experiment.ServedList): what ratings are attributed to.
served_lists = Table(
    "served_lists", metadata,
    Column("experiment_id", Text, primary_key=True),
    Column("rec_id", Text, primary_key=True),
    Column("variant", Text, nullable=False),
    Column("model_version", Text, nullable=False),
    Column("user_id", BigInteger, nullable=False),
    Column("movie_ids", Text, nullable=False),  # comma-separated, in the list's order
    Column("served_at", Float, nullable=False),
    Column("shown_rec_id", Text, nullable=True),
)
# One row per experiment and period that some process claimed (`claim`): one replica logs each period.
experiment_ticks = Table(
    "experiment_ticks", metadata,
    Column("experiment_id", Text, primary_key=True),
    Column("tick", BigInteger, primary_key=True, autoincrement=False),
)


def _create_v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[live_ratings, live_users])


def _add_experiments(conn: Connection) -> None:
    metadata.create_all(conn, tables=[served_lists, experiment_ticks])


# MIGRATIONS[i] brings a store at version i to version i + 1, inside the transaction that records the new version.
# The Table objects above describe the newest schema: a migration that changes a table states its own DDL.
MIGRATIONS: list[Callable[[Connection], None]] = [_create_v1, _add_experiments]
SCHEMA_VERSION = len(MIGRATIONS)

# A LiveRating's columns in its fields' order: rows become LiveRatings positionally, the cheapest way.
_LIVE_COLUMNS = [live_ratings.c[name] for name in LiveRating.__dataclass_fields__]
_RATINGS_OF = (select(*_LIVE_COLUMNS).where(live_ratings.c.user_id == bindparam("user_id"))
               .order_by(live_ratings.c.seq))  # built once: the hot path of every /recommend


# ----------------------------------------------------------------------------- the store


class RatingsStore:
    """Live ratings and the user ids handed out to new users, in the database at `uri`."""

    def __init__(self, uri: str):
        try:
            url = make_url(uri)
        except ArgumentError:
            raise ValueError(f"the ratings store URI {uri!r} is not a database URL") from None
        self.shown = url.render_as_string(hide_password=True)
        self._dialect = url.get_backend_name()
        if self._dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"the ratings store {self.shown} is neither SQLite nor PostgreSQL")
        with self._errors():
            self._engine = create_engine(url, **self._engine_options(url))
            if self._dialect == "sqlite":
                self._sqlite_transactions()
            self._migrate()

    def _engine_options(self, url: URL) -> dict:
        options: dict = {"pool_pre_ping": True}  # a connection dropped while the database was away is replaced
        if self._dialect == "sqlite" and url.database not in (None, "", ":memory:"):
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        elif self._dialect == "postgresql":
            options["connect_args"] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
        return options

    def _sqlite_transactions(self) -> None:
        """WAL (readers never block the writer), a busy timeout (writers of other processes wait rather than
        fail), synchronous=FULL (an acknowledged write survives an OS crash) on every new connection; write
        transactions BEGIN IMMEDIATE, taking the write lock up front so two writers never deadlock upgrading."""

        @event.listens_for(self._engine, "connect")
        def _connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.close()

        @event.listens_for(self._engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Database failures (and a store file that cannot be made) as StoreUnavailable, with a one-line reason."""
        try:
            yield
        except SQLAlchemyError as err:
            reason = str(getattr(err, "orig", None) or err).strip().splitlines()
            raise StoreUnavailable(f"ratings store {self.shown}: {type(err).__name__}: "
                                   f"{reason[0] if reason else 'failed'}") from err
        except OSError as err:
            raise StoreUnavailable(f"ratings store {self.shown}: {err}") from err

    @contextlib.contextmanager
    def _transaction(self, write: bool = False) -> Iterator[Connection]:
        with self._errors(), self._engine.connect() as conn:
            if write:
                conn.execution_options(write=True)
            with conn.begin():
                yield conn

    def _migrate(self) -> None:
        """Create the schema, or bring an older one to SCHEMA_VERSION; one process at a time (the SQLite write
        lock, a PostgreSQL advisory lock), so processes opening a new store together do not collide."""
        with self._transaction(write=True) as conn:
            if self._dialect == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))
            schema_version.create(conn, checkfirst=True)
            found = conn.scalar(select(schema_version.c.version))
            version = found or 0
            if version > SCHEMA_VERSION:
                raise StoreVersionError(f"ratings store {self.shown} has schema version {version}; this code "
                                        f"knows versions up to {SCHEMA_VERSION}: run newer code")
            for migration in MIGRATIONS[version:]:
                migration(conn)
            if found is None:
                conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
            elif version < SCHEMA_VERSION:
                conn.execute(schema_version.update().values(version=SCHEMA_VERSION))

    def _insert(self, table: Table):
        """INSERT ... ON CONFLICT DO NOTHING in the store's dialect: a row that exists already is skipped."""
        return (postgresql if self._dialect == "postgresql" else sqlite).insert(table).on_conflict_do_nothing()

    def add(self, events: Sequence[RatingEvent]) -> list[str]:
        """"stored" or "duplicate" for each event, in order, committed before this returns. A duplicate (its
        event_id stored already, or earlier in the batch, or by a concurrent add) changes nothing."""
        if not events:
            return []
        now = time.time()
        with self._transaction(write=True) as conn:
            ids = {e.event_id for e in events}
            seen = set(conn.scalars(select(live_ratings.c.event_id).where(live_ratings.c.event_id.in_(ids))))
            first: list[RatingEvent] = []
            for e in events:
                if e.event_id not in seen:
                    seen.add(e.event_id)
                    first.append(e)
            stored: set[str] = set()
            if first:
                rows = [{"event_id": e.event_id, "user_id": e.user_id, "movie_id": e.movie_id, "rating": e.rating,
                         "timestamp": int(now) if e.timestamp is None else e.timestamp, "rec_id": e.rec_id,
                         "received_at": now} for e in first]
                stored = set(conn.scalars(self._insert(live_ratings).returning(live_ratings.c.event_id), rows))
        answers, answered = [], set()
        for e in events:
            answers.append("stored" if e.event_id in stored and e.event_id not in answered else "duplicate")
            answered.add(e.event_id)
        return answers

    def new_user(self, floor: int) -> int:
        """A user id above `floor` and above every id handed out before, never handed out again."""
        while True:
            with self._transaction(write=True) as conn:
                last = conn.scalar(select(func.max(live_users.c.user_id))) or 0
                user_id = max(floor, last) + 1
                taken = conn.scalar(self._insert(live_users).values(user_id=user_id, created_at=time.time())
                                    .returning(live_users.c.user_id))
            if taken is not None:
                return int(taken)
            # PostgreSQL: a concurrent transaction took that id after this one read the maximum; read it again.

    def registered(self, user_ids: Iterable[int]) -> set[int]:
        """Which of `user_ids` new_user handed out."""
        ids = {int(u) for u in user_ids}
        if not ids:
            return set()
        with self._transaction() as conn:
            return set(conn.scalars(select(live_users.c.user_id).where(live_users.c.user_id.in_(ids))))

    def ratings_of(self, user_id: int) -> list[LiveRating]:
        """The user's live ratings, oldest first (by seq): one range of the (user_id, seq) index."""
        with self._transaction() as conn:
            return [LiveRating(*row) for row in conn.execute(_RATINGS_OF, {"user_id": user_id})]

    def stamp(self, user_id: int) -> int:
        """The seq of the user's latest live rating, 0 without any: what a cache of the user's lists compares."""
        with self._transaction() as conn:
            return conn.scalar(select(func.max(live_ratings.c.seq)).where(live_ratings.c.user_id == user_id)) or 0

    def ratings(self, after_seq: int = 0, limit: int | None = None) -> list[LiveRating]:
        """Every live rating with seq above `after_seq`, by seq, at most `limit`. On PostgreSQL seqs are drawn
        before commit, so a reader following the store by seq may see a lower seq appear after a higher one."""
        query = select(*_LIVE_COLUMNS).where(live_ratings.c.seq > after_seq).order_by(live_ratings.c.seq).limit(limit)
        with self._transaction() as conn:
            return [LiveRating(*row) for row in conn.execute(query)]

    # ------------------------------------------------------------------ online experiments (ncf.experiment)

    def add_served_lists(self, lists: Sequence[ServedList]) -> int:
        """Record served lists; one already recorded (same experiment and rec_id: a replayed or repeated answer)
        stays as first recorded. Returns how many were new."""
        if not lists:
            return 0
        rows = [{"experiment_id": x.experiment_id, "rec_id": x.rec_id, "variant": x.variant,
                 "model_version": x.model_version, "user_id": x.user_id,
                 "movie_ids": ",".join(str(m) for m in x.movie_ids), "served_at": x.served_at,
                 "shown_rec_id": x.shown_rec_id} for x in lists]
        with self._transaction(write=True) as conn:
            return len(conn.execute(self._insert(served_lists).returning(served_lists.c.rec_id), rows).all())

    def served_lists(self, experiment_id: str) -> list[ServedList]:
        """The experiment's recorded lists, oldest first (then by rec_id)."""
        query = select(served_lists).where(served_lists.c.experiment_id == experiment_id).order_by(
            served_lists.c.served_at, served_lists.c.rec_id)
        with self._transaction() as conn:
            return [ServedList(row.experiment_id, row.rec_id, row.variant, row.model_version, row.user_id,
                               tuple(int(m) for m in row.movie_ids.split(",") if m), row.served_at, row.shown_rec_id)
                    for row in conn.execute(query)]

    def ratings_for_lists(self, experiment_id: str) -> list[LiveRating]:
        """The live ratings posted with the rec_id of one of the experiment's lists (or of the list a shadow list
        stood beside), by seq."""
        mine = served_lists.c.experiment_id == experiment_id
        rec_ids = select(served_lists.c.rec_id).where(mine).union(
            select(served_lists.c.shown_rec_id).where(mine, served_lists.c.shown_rec_id.is_not(None)))
        query = select(*_LIVE_COLUMNS).where(live_ratings.c.rec_id.in_(rec_ids)).order_by(live_ratings.c.seq)
        with self._transaction() as conn:
            return [LiveRating(*row) for row in conn.execute(query)]

    def claim(self, experiment_id: str, tick: int) -> bool:
        """Whether this call is the first to claim period `tick` of the experiment, of every process on the
        store: the one that does the period's work (log the metrics, decide)."""
        with self._transaction(write=True) as conn:
            return conn.scalar(self._insert(experiment_ticks).values(experiment_id=experiment_id, tick=tick)
                               .returning(experiment_ticks.c.tick)) is not None

    def count(self) -> int:
        with self._transaction() as conn:
            return conn.scalar(select(func.count()).select_from(live_ratings))

    def close(self) -> None:
        self._engine.dispose()
