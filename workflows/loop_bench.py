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
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from ncf.online_metrics import ExperimentMetrics, VariantMetrics
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


async def answers(connection: Connection, path: str) -> dict:
    """The JSON answer of GET `path` ({} when it failed)."""
    status, body = await connection.request("GET", path)
    return json.loads(body) if status == 200 else {}


async def every_replica(base: str, holds: Callable[[Connection], Awaitable[bool]], what: str, reads: int = 8,
                        timeout_s: float = 120.0) -> None:
    """Until `holds` is true of `reads` answers in a row (the proxy spreads them over the replicas, so a run of them
    reaches every replica); `what` names it in the TimeoutError after `timeout_s`."""
    connection, in_a_row, deadline = Connection(base), 0, time.monotonic() + timeout_s
    try:
        while in_a_row < reads:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every replica {what} within {timeout_s:g} s")
            in_a_row = in_a_row + 1 if await holds(connection) else 0
            await asyncio.sleep(0.05)
    finally:
        connection.close()


async def experiment_started(base: str, experiment_id: str) -> None:
    """Until every replica runs the experiment `experiment_id`."""
    async def runs(connection: Connection) -> bool:
        return (await answers(connection, "/experiment")).get("experiment_id") == experiment_id

    await every_replica(base, runs, f"started experiment {experiment_id}")


async def settled(base: str, version: str) -> None:
    """Until every replica answers from model `version` alone, no experiment running: the decision is taken in."""
    async def alone(connection: Connection) -> bool:
        return ((await answers(connection, "/experiment")).get("running") is False
                and (await answers(connection, "/version")).get("model_version") == version)

    await every_replica(base, alone, f"served version {version} alone")


# ----------------------------------------------------------------------------- what the record holds


@dataclass
class Stages:
    """Each stage's wall time, in the order they ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        print(f"{name} ...", flush=True)
        yield
        self.seconds[name] = time.perf_counter() - started
        print(f"{name}: {self.seconds[name]:.1f} s", flush=True)


HOLDOUT_MODELS = {"champion_frozen": "champion, frozen (dataset ratings only)",
                  "champion_served": "champion as served (live ratings folded in)",
                  "challenger": "retrained challenger"}
HOLDOUT_FIGURES = ("full_ndcg_at_10", "full_hit_rate_at_10", "full_recall_at_10")


@dataclass(frozen=True)
class RetrainFigures:
    """What `make retrain` recorded of its challenger: the live ratings it saw, the fresh hold-out's figures, the
    differences with their intervals and the offline gate."""

    version: str
    tags: dict[str, str]
    metrics: dict[str, float]

    @classmethod
    def of(cls, client: MlflowClient, version: ModelVersion) -> RetrainFigures:
        return cls(str(version.version), dict(version.tags), client.get_run(version.run_id).data.metrics)

    def lines(self) -> list[str]:
        t, m = self.tags, self.metrics
        rows = [f"| {label} | " + " | ".join(f"{m.get(f'holdout/{model}/{f}', float('nan')):.4f}"
                                             for f in HOLDOUT_FIGURES) + " |"
                for model, label in HOLDOUT_MODELS.items()]

        def interval(label: str) -> str:
            key = f"holdout_ndcg_{label}"
            return (f"{m[key]:+.4f} [{m[key + '_low']:+.4f}, {m[key + '_high']:+.4f}]" if key in m else "n/a")

        return [
            f"Version {self.version}: trained on {t.get('retrain.live_ratings')} live ratings (seq up to "
            f"{t.get('retrain.cut_seq')}, SHA-256 {t.get('retrain.live_sha256', '')[:12]}...); fresh hold-out: the "
            f"{t.get('retrain.holdout_ratings')} newest, {t.get('retrain.holdout_users')} users with a relevant one.",
            "", "| fresh hold-out | NDCG@10 | HR@10 | Recall@10 |", "|---|---|---|---|", *rows, "",
            f"- Challenger NDCG@10 minus the frozen champion: {interval('minus_champion_frozen')}; minus the champion "
            f"as served: {interval('minus_champion_served')} (95% paired bootstrap over users).",
            f"- Offline gate: **{t.get('challenger.offline_gate')}**" + (
                f" ({t['challenger.offline_gate_reason']})." if t.get("challenger.offline_gate") != "passed" else "."),
        ]


def variant_row(v: VariantMetrics) -> str:
    mean = f"{v.mean_rating.estimate:.2f} [{v.mean_rating.low:.2f}, {v.mean_rating.high:.2f}]" if v.mean_rating else "-"
    coverage = f"{v.catalogue_coverage:.3f}" if v.catalogue_coverage is not None else "-"
    return (f"| {v.variant} (v{v.model_version}) | {v.lists_served} | {v.ratings_attributed} | "
            f"{v.rated_list_rate.estimate:.3f} [{v.rated_list_rate.low:.3f}, {v.rated_list_rate.high:.3f}] | "
            f"{v.positive_share.estimate:.3f} | {mean} | {coverage} | "
            f"**{v.positive_rate.estimate:.3f}** [{v.positive_rate.low:.3f}, {v.positive_rate.high:.3f}] |")


def online_lines(metrics: ExperimentMetrics, margin: float) -> list[str]:
    d = metrics.positive_rate_difference
    return [
        "| variant | lists served | ratings attributed | lists rated (95%) | ratings >= 4 | mean rating (95%) | "
        "catalogue coverage | positive rate (95%) |", "|---|---|---|---|---|---|---|---|",
        variant_row(metrics.champion), variant_row(metrics.challenger), "",
        f"- Positive rate, challenger minus champion: {d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}] (Newcombe 95%); "
        f"one-sided 95% lower bound {metrics.positive_rate_difference_lower:+.4f} against -margin = {-margin:+g}.",
    ]


def rounds_lines(rounds: list[Round]) -> list[str]:
    rows = ["| round | answers (champion / challenger) | lists with a rated movie | ratings posted | of them >= 4 "
            "| failed requests | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rounds:
        rows.append(f"| {r.name} | {r.lists['champion']} / {r.lists['challenger']} | "
                    f"{sum(r.rated_lists.values())} | {r.posted} | {sum(r.positive.values())} | {r.failed} | "
                    f"{r.seconds:.1f} |")
    return rows
