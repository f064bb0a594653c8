"""The closed loop's simulated users (`jobs.bench_loop`), against a served app over loopback HTTP with the light
clients of `workflows.http_load`.

The seed split's held-out test ratings stand for what each user would do: in each round every user asks for their
top 10 (`GET /recommend`) and rates, in one `POST /ratings` carrying the answer's `rec_id`, the shown movies that are
among their held-out ratings not rated yet, with those ratings. A user whose list shows none of them rates nothing
that round. `hammer` measures failed requests while the champion alias moves.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

from workflows.feedback_bench import K, Ledger, ReplayedRating, auth_headers, rating_body
from workflows.http_load import Connection


@dataclass
class SimulatedUser:
    """A user's held-out ratings by movie id, and those not rated through the app yet."""

    user_id: int
    held_out: dict[int, ReplayedRating]
    unrated: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, ratings: list[ReplayedRating]) -> SimulatedUser:
        held_out = {r.movie_id: r for r in ratings}  # a movie rated twice counts with its latest rating
        return cls(ratings[0].user_id, held_out, set(held_out))


@dataclass
class Round:
    """What one round of asking and rating did, per variant of the answers."""

    name: str
    lists: Counter = field(default_factory=Counter)  # variant -> answers shown
    rated_lists: Counter = field(default_factory=Counter)  # variant -> answers with a shown movie rated
    ratings: Counter = field(default_factory=Counter)  # variant -> ratings posted of shown movies
    positive: Counter = field(default_factory=Counter)  # variant -> of them, ratings >= the relevant rating
    versions: Counter = field(default_factory=Counter)  # model version -> answers
    failed: int = 0  # requests answered with an error status or not at all
    seconds: float = 0.0

    @property
    def posted(self) -> int:
        return sum(self.ratings.values())


async def simulate_round(base: str, users: list[SimulatedUser], clients: int, name: str, relevant_rating: float,
                         ledger: Ledger) -> Round:
    """One round: every user once, taken from one queue by `clients` clients."""
    result, queue = Round(name), iter(users)

    async def client() -> None:
        connection = Connection(base, auth_headers())
        for user in queue:
            status, answer = await connection.request("GET", f"/recommend?user_id={user.user_id}&k={K}")
            if status != 200:
                result.failed += 1
                continue
            body = json.loads(answer)
            variant = body["variant"]
            result.lists[variant] += 1
            result.versions[body["model_version"]] += 1
            rated = [user.held_out[item["movie_id"]] for item in body["items"] if item["movie_id"] in user.unrated]
            if not rated:
                continue
            events = [{"event_id": f"{name}-{r.user_id}-{r.movie_id}", "user_id": r.user_id, "movie_id": r.movie_id,
                       "rating": r.rating, "timestamp": r.timestamp, "rec_id": body["rec_id"]} for r in rated]
            status, answer = await connection.request("POST", "/ratings", rating_body(events))
            outcomes = ledger.record([e["event_id"] for e in events], status, answer)
            if status != 200:
                result.failed += 1
                continue
            stored = [r for r, outcome in zip(rated, outcomes, strict=True) if outcome in ("stored", "duplicate")]
            user.unrated -= {r.movie_id for r in stored}
            result.rated_lists[variant] += bool(stored)
            result.ratings[variant] += len(stored)
            result.positive[variant] += sum(r.rating >= relevant_rating for r in stored)
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class Hammered:
    """Requests sent while an alias moved, and how many failed."""

    requests: int
    failed: int
    seconds: float


async def hammer(base: str, user_ids: list[int], clients: int, until) -> Hammered:
    """`clients` clients asking for the users' top 10 in turn, back to back, until `until()` (a coroutine function)
    returns; counts the requests and those that failed (any status but 200, or no answer)."""
    done = asyncio.Event()
    counts = {"requests": 0, "failed": 0}

    async def client(number: int) -> None:
        connection = Connection(base)
        i = number
        while not done.is_set():
            status = await connection.get(f"/recommend?user_id={user_ids[i % len(user_ids)]}&k={K}")
            counts["requests"] += 1
            counts["failed"] += status != 200
            i += clients
        connection.close()

    async def stopper() -> None:
        try:
            await until()
        finally:
            done.set()

    started = time.perf_counter()
    await asyncio.gather(stopper(), *(client(n) for n in range(clients)))
    return Hammered(counts["requests"], counts["failed"], time.perf_counter() - started)
