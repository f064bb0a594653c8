"""The live-ratings benchmark's phases (`jobs.bench_feedback`), each against a served app over loopback HTTP with
the light clients of `workflows.http_load`, all in one event loop:

- `replay`: the prequential replay of the seed split's test ratings, each user's in time order on one client:
  before each rating, the user's top 10 (`GET /recommend`), then the rating (`POST /ratings`); a relevant rating
  is a hit when its movie was in the list shown just before it.
- `freshness`: a rating of a movie in the user's top 10, then reads of their top 10 until several in a row leave
  it out: the time from the acknowledgement to the first of them.
- `ingest`: batches of ratings from several clients for a while, some sent twice (a client retrying), with another
  client reading recommendations meanwhile.
Every acknowledged event id goes into a `Ledger`, which `StoreCheck` compares with what the store holds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ncf.data import MovieLens
from ncf.recommender import Recommender
from ncf.user_ratings import Profiles
from workflows.http_load import Connection, Phase

K = 10  # the length of the lists shown


@dataclass(frozen=True)
class ReplayedRating:
    user_id: int
    movie_id: int
    rating: float
    timestamp: int


def ratings_to_replay(data: MovieLens, users: int | None = None, seed: int = 0) -> list[list[ReplayedRating]]:
    """Each user's ratings of the seed split's test part (their latest), oldest first, one list per user; all
    users, or a random sample of `users` of them."""
    test = data.splits.test
    order = np.lexsort((np.arange(len(test)), test.timestamp, test.user))
    user_ids, movie_ids = data.ids.user_ids[test.user[order]], data.ids.movie_ids[test.movie[order]]
    rows = [ReplayedRating(int(u), int(m), float(r), int(t))
            for u, m, r, t in zip(user_ids, movie_ids, test.rating[order], test.timestamp[order], strict=True)]
    by_user: dict[int, list[ReplayedRating]] = {}
    for row in rows:
        by_user.setdefault(row.user_id, []).append(row)
    chosen = sorted(by_user) if users is None else sorted(random.Random(seed).sample(sorted(by_user),
                                                                                     min(users, len(by_user))))
    return [by_user[u] for u in chosen]


def auth_headers() -> dict[str, str]:
    """The writes' bearer token when NCF_API_TOKEN is set (the app then asks for it)."""
    token = os.environ.get("NCF_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass
class Ledger:
    """What the app answered to the posted events: the acknowledged ("stored") event ids, and every other
    outcome counted."""

    acknowledged: list[str] = field(default_factory=list)
    duplicates: int = 0  # answered "duplicate" to a first post of its event id
    rejected: Counter = field(default_factory=Counter)  # reason -> events
    failed: int = 0  # events of posts answered with an error status or no answer: not acknowledged

    def record(self, event_ids: list[str], status: int, answer: bytes) -> list[str]:
        """Record one POST /ratings answer; returns each event's status ("failed" for all when not 200)."""
        if status != 200:
            self.failed += len(event_ids)
            return ["failed"] * len(event_ids)
        results = json.loads(answer)["results"]
        for event_id, result in zip(event_ids, results, strict=True):
            if result["status"] == "stored":
                self.acknowledged.append(event_id)
            elif result["status"] == "duplicate":
                self.duplicates += 1
            else:
                self.rejected[result["reason"]] += 1
        return [result["status"] for result in results]


@dataclass(frozen=True)
class StoreCheck:
    """The store against the ledger: it must hold every acknowledged event (`lost`: acknowledged, not held), each
    once (`duplicated`: event ids held more than once). `unacknowledged`: held without an acknowledgement (a post
    that failed after its commit; allowed)."""

    held: int
    lost: int
    duplicated: int
    unacknowledged: int

    @classmethod
    def of(cls, ledger: Ledger, held_event_ids: list[str]) -> StoreCheck:
        held, acknowledged = set(held_event_ids), set(ledger.acknowledged)
        return cls(len(held_event_ids), len(acknowledged - held), len(held_event_ids) - len(held),
                   len(held - acknowledged))


def rating_body(events: list[dict]) -> bytes:
    return json.dumps({"ratings": events}).encode()


async def shown(connection: Connection, user_id: int, latencies: list[float]) -> tuple[list[int], str | None] | None:
    """The movie ids of the user's top 10 and the answer's rec_id (None when the request failed); its latency
    (ms) appended to `latencies`."""
    begin = time.perf_counter()
    status, answer = await connection.request("GET", f"/recommend?user_id={user_id}&k={K}")
    if status != 200:
        return None
    latencies.append(1000 * (time.perf_counter() - begin))
    body = json.loads(answer)
    return [item["movie_id"] for item in body["items"]], body["rec_id"]


@dataclass
class Prequential:
    """One replay: hits among the relevant ratings, and the requests' latencies."""

    name: str
    relevant: int
    hits: int
    gain: float  # sum over the hits of 1 / log2(rank + 1)
    acknowledged: int
    seconds: float
    recommend: Phase
    post: Phase

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.relevant, 1)

    @property
    def ndcg(self) -> float:
        return self.gain / max(self.relevant, 1)

    @property
    def ratings_per_s(self) -> float:
        return self.acknowledged / self.seconds


async def replay(base: str, users: list[list[ReplayedRating]], clients: int, relevant_rating: float, tag: str,
                 ledger: Ledger) -> Prequential:
    """Every user's ratings posted one at a time in order, each after a look at the user's top 10; users are taken
    from one queue by `clients` clients. A relevant rating (>= `relevant_rating`) scores when its movie was shown."""
    queue = iter(users)
    recommend_ms: list[float] = []
    post_ms: list[float] = []
    score = {"relevant": 0, "hits": 0, "gain": 0.0, "recommend_errors": 0, "post_errors": 0, "acknowledged": 0}

    async def client() -> None:
        connection = Connection(base, auth_headers())
        for ratings in queue:
            for i, rating in enumerate(ratings):
                answer = await shown(connection, rating.user_id, recommend_ms)
                score["recommend_errors"] += answer is None
                movies, rec_id = answer or ([], None)
                if rating.rating >= relevant_rating:
                    score["relevant"] += 1
                    if rating.movie_id in movies:
                        score["hits"] += 1
                        score["gain"] += 1 / math.log2(movies.index(rating.movie_id) + 2)
                event_id = f"{tag}-{rating.user_id}-{i}"
                begin = time.perf_counter()
                status, body = await connection.request("POST", "/ratings", rating_body([{
                    "event_id": event_id, "user_id": rating.user_id, "movie_id": rating.movie_id,
                    "rating": rating.rating, "timestamp": rating.timestamp, "rec_id": rec_id}]))
                if ledger.record([event_id], status, body) == ["stored"]:
                    post_ms.append(1000 * (time.perf_counter() - begin))
                    score["acknowledged"] += 1
                else:
                    score["post_errors"] += 1
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - started
    return Prequential(tag, score["relevant"], score["hits"], score["gain"], score["acknowledged"], seconds,
                       Phase(f"{tag}: GET /recommend", "/recommend", clients, None, recommend_ms,
                             score["recommend_errors"], seconds),
                       Phase(f"{tag}: POST /ratings (1 rating)", "/ratings", clients, None, post_ms,
                             score["post_errors"], seconds))


@dataclass
class Freshness:
    """Seconds from each acknowledged rating to the first of `reads` reads in a row without its movie."""

    delays_s: list[float]
    reads: int
    stale_reads: int  # reads after the acknowledgement that still showed the movie
    not_reached: int  # users whose reads never left it out `reads` times in a row within the time limit
    skipped: int  # users with nothing shown to rate
    recommend: Phase

    def percentile_ms(self, q: float) -> float:
        return 1000 * float(np.percentile(self.delays_s, q)) if self.delays_s else float("nan")


async def freshness(base: str, user_ids: list[int], clients: int, reads: int, limit_s: float, rating: float,
                    tag: str, ledger: Ledger) -> Freshness:
    """Per user (taken from one queue by `clients` clients): the top movie of their list rated `rating`, then
    their list read back to back until `reads` answers in a row leave it out, or `limit_s` passes."""
    queue = iter(user_ids)
    recommend_ms: list[float] = []
    result = Freshness([], reads, 0, 0, 0, Phase(f"{tag}: GET /recommend", "/recommend", clients, None,
                                                    recommend_ms, 0, 0.0))

    async def client() -> None:
        connection = Connection(base, auth_headers())
        for user_id in queue:
            answer = await shown(connection, user_id, recommend_ms)
            if answer is None or not answer[0]:
                result.skipped += 1
                continue
            movie = answer[0][0]
            event_id = f"{tag}-{user_id}"
            status, body = await connection.request("POST", "/ratings", rating_body([{
                "event_id": event_id, "user_id": user_id, "movie_id": movie, "rating": rating, "timestamp": None,
                "rec_id": answer[1]}]))
            if ledger.record([event_id], status, body) != ["stored"]:
                result.skipped += 1
                continue
            acknowledged = time.perf_counter()
            first, in_a_row = 0.0, 0
            while in_a_row < reads and time.perf_counter() - acknowledged < limit_s:
                now = await shown(connection, user_id, recommend_ms)
                if now is None:
                    result.recommend.errors += 1
                elif movie in now[0]:
                    result.stale_reads += 1
                    in_a_row = 0
                else:
                    first = first if in_a_row else time.perf_counter()
                    in_a_row += 1
            if in_a_row == reads:
                result.delays_s.append(first - acknowledged)
            else:
                result.not_reached += 1
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    result.recommend.seconds = time.perf_counter() - started
    return result


@dataclass
class Ingest:
    acknowledged: int
    seconds: float
    batch: int
    retried_batches: int
    retried_not_duplicate: int  # events of retried batches not answered "duplicate"
    post: Phase
    recommend: Phase

    @property
    def ratings_per_s(self) -> float:
        return self.acknowledged / self.seconds


async def ingest(base: str, user_ids: list[int], movie_ids: list[int], values: list[float], clients: int,
                 batch: int, seconds: float, retry_share: float, tag: str, ledger: Ledger, seed: int = 0,
                 rate: float | None = None) -> Ingest:
    """`clients` clients posting batches of `batch` random valid ratings (known users and movies, values of the
    scale, new event ids) for `seconds`, back to back or, with `rate`, paced to offer that many ratings a second
    in all (a client behind its schedule sends at once); a random `retry_share` of the batches posted a second
    time as they were; meanwhile one more client reads random users' top 10."""
    deadline = time.perf_counter() + seconds
    post_ms: list[float] = []
    recommend_ms: list[float] = []
    counts = {"acknowledged": 0, "post_errors": 0, "recommend_errors": 0, "retried": 0, "not_duplicate": 0}

    interval = clients * batch / rate if rate else 0.0  # between one client's batches

    async def poster(number: int) -> None:
        rng, connection = random.Random(f"{seed}-{number}"), Connection(base, auth_headers())
        next_at = time.perf_counter() + number * interval / clients
        for sent in itertools.count():
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += interval
            if time.perf_counter() > deadline:
                break
            events = [{"event_id": f"{tag}-{number}-{sent}-{i}", "user_id": rng.choice(user_ids),
                       "movie_id": rng.choice(movie_ids), "rating": rng.choice(values), "timestamp": int(time.time()),
                       "rec_id": None} for i in range(batch)]
            ids, body = [e["event_id"] for e in events], rating_body(events)
            begin = time.perf_counter()
            status, answer = await connection.request("POST", "/ratings", body)
            stored = ledger.record(ids, status, answer).count("stored")
            if status == 200:
                post_ms.append(1000 * (time.perf_counter() - begin))
                counts["acknowledged"] += stored
            else:
                counts["post_errors"] += 1
            if status == 200 and rng.random() < retry_share:
                counts["retried"] += 1
                status, answer = await connection.request("POST", "/ratings", body)
                statuses = json.loads(answer)["results"] if status == 200 else [{}] * len(ids)
                counts["not_duplicate"] += sum(s.get("status") != "duplicate" for s in statuses)
        connection.close()

    async def reader() -> None:
        rng, connection = random.Random(f"{seed}-reader"), Connection(base, auth_headers())
        while time.perf_counter() < deadline:
            counts["recommend_errors"] += await shown(connection, rng.choice(user_ids), recommend_ms) is None
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(reader(), *(poster(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    return Ingest(counts["acknowledged"], elapsed, batch, counts["retried"], counts["not_duplicate"],
                  Phase(f"{tag}: POST /ratings ({batch} ratings)", "/ratings", clients, rate / batch if rate else None,
                        post_ms, counts["post_errors"], elapsed),
                  Phase(f"{tag}: GET /recommend meanwhile", "/recommend", 1, None, recommend_ms,
                        counts["recommend_errors"], elapsed))


def fold_in_profiles(rec: Recommender, n_ratings: int) -> Iterator[Profiles]:
    """Profiles of `n_ratings` ratings of real users, endlessly: each user with that many, their latest ones."""
    users = np.flatnonzero(rec.ratings_per_user() >= n_ratings)
    if not len(users):
        raise ValueError(f"no user has {n_ratings} ratings to fold in")
    while True:
        for user in users:
            rated = rec.ratings_of(int(user))
            latest = np.argsort(rated.timestamp, kind="stable")[-n_ratings:]
            yield Profiles.one(rated.movie[latest], rated.rating[latest], rated.timestamp[latest], int(user))


def time_fold_ins(rec: Recommender, n_ratings: int, runs: int) -> list[float]:
    """Milliseconds of `runs` fold-ins of one user's `n_ratings` ratings (`Recommender.fold_in`), on one torch
    thread as a replica runs them; one warm-up fold-in first (its first call allocates)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        profiles = fold_in_profiles(rec, n_ratings)
        rec.fold_in(next(profiles))
        times = []
        for profile in (next(profiles) for _ in range(runs)):
            begin = time.perf_counter()
            rec.fold_in(profile)
            times.append(1000 * (time.perf_counter() - begin))
        return times
    finally:
        torch.set_num_threads(threads)
