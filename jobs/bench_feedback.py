"""Live ratings end to end over loopback HTTP: how much they improve recommendations, how fast they show, how many
the service takes in, and whether the store keeps exactly what it acknowledged.

    python -m jobs.bench_feedback [--model-uri URI ...] [--users N] [--clients 8] [--fresh-users 200]
                                  [--fresh-reads 5] [--seconds 60] [--batch 100] [--ingest-rate 2200]
                                  [--fold-in-runs 200]
                                  [--out docs/benchmarks/feedback.md] [--set section.key=value ...]

`make bench-feedback` measures the champion; the record (docs/benchmarks/feedback.md) measures one model per preset,
each with its own --model-uri, e.g. `make bench-feedback ARGS="--model-uri models:/ncf-movielens/1 --model-uri
models:/ncf-movielens/2"`: one section per model, titled with the preset it was trained with.

Per model, the app runs as `make serve` runs it (conf/serve.yaml and `--set` overrides, `serving.runtime.running`)
on a free 127.0.0.1 port with 2 replicas (min = max), twice, each time with a fresh temporary SQLite ratings store:
1. serve.live_updates=true:
   - the prequential replay: the seed split's test ratings (each user's latest) replayed per user in time order by
     --clients clients (users shared out from one queue, each user's ratings in order on one client): before each
     rating `GET /recommend?user_id=&k=10`, then `POST /ratings` with that rating (its own event_id, the answer's
     rec_id). HR@10: the share of relevant ratings (>= evaluation.relevant_rating) whose movie was in the list
     shown just before; NDCG@10: the mean of 1/log2(rank + 1) over them (0 for a miss);
   - freshness: for --fresh-users users, one rating of the movie at the top of their list, then their list read back
     to back until --fresh-reads reads in a row leave it out: the time from the acknowledgement to the answer of the
     first of them. Ray Serve's proxy chooses the replica of each read, so a run of reads spreads over both
     replicas: the time bounds the slower one;
   - ingestion: --clients clients posting batches of --batch random valid ratings (known users and movies, new event
     ids) for --seconds, twice: paced to offer --ingest-rate ratings/s in all, then back to back; 5% of the batches
     posted a second time as a retrying client would (each must come back "duplicate"), while one more client reads
     random users' lists;
   then the store is read directly and compared with every event the app acknowledged.
2. serve.live_updates=false (frozen: ratings stored, answers from the dataset's ratings alone): the same replay.
And in this process: one user's NCF fold-in (`Recommender.fold_in`) of --fold-in-ratings ratings on one torch thread.

Requests go through `workflows.http_load`'s light keep-alive client, all clients in one event loop; the phases are
`workflows.feedback_bench`. When NCF_API_TOKEN is set, every request carries it.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import mlflow
import numpy as np
from mlflow import MlflowClient

from ncf.config import ServeConfig, load_config, override_parser
from ncf.data import MovieLens
from ncf.feedback_store import RatingsStore
from ncf.files import write_atomically
from ncf.integrations import mlflow_tracking
from ncf.ports import free_port
from ncf.prepared import load_movielens
from serving.model_version import resolve_version
from serving.runtime import running
from workflows.benchmarks import machine_line
from workflows.feedback_bench import (
    Freshness,
    Ingest,
    Ledger,
    Prequential,
    ReplayedRating,
    StoreCheck,
    freshness,
    ingest,
    ratings_to_replay,
    replay,
    time_fold_ins,
)
from workflows.http_load import Phase

OUT = Path("docs") / "benchmarks" / "feedback.md"  # run from the repository root (`make bench-feedback`)
TARGETS = {"hit_rate_ratio": 1.3, "fresh_p99_ms": 1000.0, "ingest_per_s": 2000.0, "ingest_recommend_p99_ms": 100.0,
           "fold_in_p99_ms": 10.0}
REPLICAS = 2
RETRY_SHARE = 0.05  # of the ingested batches, posted a second time
FRESH_RATING = 3.0  # what the freshness phase rates the top movie: on every dataset's scale
WARM_TIMEOUT_S = 600


@dataclass
class ModelRun:
    """Everything measured of one model version."""

    model_uri: str
    version: str
    preset: str
    model: str  # its architecture in words
    live: Prequential
    frozen: Prequential
    fresh: Freshness
    paced: Ingest  # offered --ingest-rate ratings/s
    ingested: Ingest  # back to back
    checks: dict[str, StoreCheck]  # per session: "live", "frozen"
    ledgers: dict[str, Ledger]
    fold_in_ms: list[float]
    fold_in_ratings: int


def held_event_ids(store_uri: str) -> list[str]:
    """Every event id the ratings store holds, read directly (not through the app)."""
    store = RatingsStore(store_uri)
    try:
        ids = [rating.event_id for rating in store.ratings()]
        if store.count() != len(ids):
            raise RuntimeError(f"the store counts {store.count()} ratings but lists {len(ids)}")
        return ids
    finally:
        store.close()


def wait_until_warm(base: str, users: int, timeout_s: float) -> None:
    """Until every replica has ranked the users it warms at start (serve.warm_users): replicas answer meanwhile,
    but their warming would share the cores with the first phase. /healthz reaches a replica the proxy picks, so
    the count must hold on several reads in a row."""
    deadline, in_a_row = time.monotonic() + timeout_s, 0
    while in_a_row < 4 * REPLICAS:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replicas had not warmed {users} users after {timeout_s:.0f} s")
        in_a_row = in_a_row + 1 if httpx.get(f"{base}/healthz", timeout=60).json()["cached_users"] >= users else 0
        time.sleep(0.2)


@contextmanager
def serving(config: ServeConfig, tracking_uri: str, users: int) -> Iterator[tuple[str, str]]:
    """The app as `make serve` runs it with `config`, on a fresh ratings store; yields its URL and the store's URI."""
    with tempfile.TemporaryDirectory(prefix="ncf-bench-feedback-") as tmp:
        store_uri = f"sqlite:///{Path(tmp) / 'ratings.db'}"
        with running(config, tracking_uri, store_uri) as base:
            wait_until_warm(base, min(config.warm_users, users), WARM_TIMEOUT_S)
            yield base, store_uri


def bench_model(model_uri: str, args, data: MovieLens, users: list[list[ReplayedRating]], relevant: float,
                tracking_uri: str) -> ModelRun:
    """Fold-in timing, then the app served live (replay, freshness, ingestion) and frozen (replay)."""
    client = MlflowClient(tracking_uri, tracking_uri)
    version = resolve_version(model_uri, client)
    pinned = f"models:/{version.name}/{version.version}"  # an alias moving meanwhile changes nothing
    with tempfile.TemporaryDirectory(prefix="ncf-bench-feedback-model-") as tmp:
        rec = mlflow_tracking.load_recommender(pinned, tmp)
    cfg = rec.model.cfg
    retriever = rec.candidates.name if rec.candidates is not None else "none"
    model = f"embedding {cfg.embedding_dim}, MLP {cfg.hidden_dims}, retriever {retriever}"
    preset = str(rec.config.get("preset", "?"))
    print(f"{pinned} ({preset} preset): {args.fold_in_runs} fold-ins of {args.fold_in_ratings} ratings ...",
          flush=True)
    fold_in_ms = time_fold_ins(rec, args.fold_in_ratings, args.fold_in_runs)
    del rec
    rng = random.Random(0)
    user_ids, movie_ids = data.ids.user_ids.tolist(), data.ids.movie_ids.tolist()
    values = np.unique(data.splits.train.rating).tolist()
    fresh_users = rng.sample(user_ids, min(args.fresh_users, len(user_ids)))
    ledgers, checks, replays = {"live": Ledger(), "frozen": Ledger()}, {}, {}
    for mode in ("live", "frozen"):
        serve_conf = load_config([*args.overrides, f"serve.model_uri={pinned}", f"serve.port={free_port()}",
                                  f"serve.min_replicas={REPLICAS}", f"serve.max_replicas={REPLICAS}",
                                  f"serve.live_updates={str(mode == 'live').lower()}"], preset=args.preset).serve
        print(f"serving {pinned} with serve.live_updates={serve_conf.live_updates} ...", flush=True)
        with serving(serve_conf, tracking_uri, len(user_ids)) as (base, store_uri):
            print(f"replay ({mode}): {sum(map(len, users))} ratings of {len(users)} users ...", flush=True)
            replays[mode] = asyncio.run(replay(base, users, args.clients, relevant, f"replay-{mode}", ledgers[mode]))
            print(f"  HR@10 {replays[mode].hit_rate:.4f}, NDCG@10 {replays[mode].ndcg:.4f}, "
                  f"{replays[mode].ratings_per_s:.1f} ratings/s", flush=True)
            if mode == "live":
                print(f"freshness: {len(fresh_users)} users ...", flush=True)
                fresh = asyncio.run(freshness(base, fresh_users, args.clients, args.fresh_reads, args.fresh_limit_s,
                                              FRESH_RATING, "fresh", ledgers[mode]))
                print(f"  p50 {fresh.percentile_ms(50):.1f} ms, p99 {fresh.percentile_ms(99):.1f} ms", flush=True)
                print(f"ingestion: {args.clients} clients x batches of {args.batch} for {args.seconds:g} s ...",
                      flush=True)
                paced, ingested = (
                    asyncio.run(ingest(base, user_ids, movie_ids, values, args.clients, args.batch, args.seconds,
                                       RETRY_SHARE, tag, ledgers[mode], rate=rate))
                    for tag, rate in (("ingest-paced", args.ingest_rate), ("ingest", None)))
                for phase in (paced, ingested):
                    print(f"  {phase.post.name}: {phase.ratings_per_s:.0f} ratings/s, /recommend p99 "
                          f"{phase.recommend.percentile(99):.1f} ms", flush=True)
            checks[mode] = StoreCheck.of(ledgers[mode], held_event_ids(store_uri))
            print(f"  store: {checks[mode]}", flush=True)
    return ModelRun(pinned, str(version.version), preset, model, replays["live"], replays["frozen"], fresh, paced,
                    ingested, checks, ledgers, fold_in_ms, args.fold_in_ratings)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def section(run: ModelRun, relevant: float) -> list[str]:
    live, frozen, fresh, paced, ingested = run.live, run.frozen, run.fresh, run.paced, run.ingested
    ratio = live.hit_rate / frozen.hit_rate if frozen.hit_rate else float("inf")
    fold_p50, fold_p99 = np.percentile(run.fold_in_ms, 50), np.percentile(run.fold_in_ms, 99)
    clean = all(c.lost == 0 and c.duplicated == 0 for c in run.checks.values())
    targets = [
        (f"prequential HR@10 with live updates >= {TARGETS['hit_rate_ratio']}x the frozen baseline: "
         f"{live.hit_rate:.4f} vs {frozen.hit_rate:.4f} = {ratio:.2f}x", ratio >= TARGETS["hit_rate_ratio"]),
        (f"acknowledged rating -> /recommend without the movie on every replica ({fresh.reads} reads in a row): "
         f"p99 <= {TARGETS['fresh_p99_ms']:.0f} ms: {fresh.percentile_ms(99):.1f} ms ({fresh.not_reached} users never "
         "reached it)", fresh.percentile_ms(99) <= TARGETS["fresh_p99_ms"] and fresh.not_reached == 0),
        (f"ingestion >= {TARGETS['ingest_per_s']:,.0f} ratings/s with /recommend p99 <= "
         f"{TARGETS['ingest_recommend_p99_ms']:.0f} ms meanwhile: {paced.ratings_per_s:,.0f}/s taken in (paced, "
         f"{paced.post.offered:,.1f} batches/s offered) with /recommend p99 {paced.recommend.percentile(99):.1f} ms; "
         f"back to back {ingested.ratings_per_s:,.0f}/s with /recommend p99 {ingested.recommend.percentile(99):.1f} ms",
         paced.ratings_per_s >= TARGETS["ingest_per_s"]
         and paced.recommend.percentile(99) <= TARGETS["ingest_recommend_p99_ms"]),
        ("the store holds exactly the acknowledged events: lost " + ", ".join(
            f"{c.lost} / duplicated {c.duplicated} ({mode})" for mode, c in run.checks.items())
         + f"; {paced.retried_batches + ingested.retried_batches} batches posted again: "
         f"{paced.retried_not_duplicate + ingested.retried_not_duplicate} of their events not answered duplicate",
         clean and paced.retried_not_duplicate + ingested.retried_not_duplicate == 0),
        (f"one user's NCF fold-in ({run.fold_in_ratings} ratings) p99 <= {TARGETS['fold_in_p99_ms']:.0f} ms: "
         f"{fold_p99:.2f} ms", fold_p99 <= TARGETS["fold_in_p99_ms"]),
    ]
    phases: list[Phase] = [live.recommend, live.post, frozen.recommend, frozen.post, fresh.recommend, paced.post,
                           paced.recommend, ingested.post, ingested.recommend]
    return [
        f"## {run.preset} preset: `{run.model_uri}`",
        "",
        f"Version {run.version}: {run.model}.",
        "",
        *(f"- {verdict(ok)}: {text}" for text, ok in targets),
        "",
        "| prequential replay | live updates | frozen |",
        "|---|---|---|",
        f"| relevant ratings (>= {relevant:g}) | {live.relevant} | {frozen.relevant} |",
        f"| HR@10 | {live.hit_rate:.4f} | {frozen.hit_rate:.4f} |",
        f"| NDCG@10 | {live.ndcg:.4f} | {frozen.ndcg:.4f} |",
        f"| ratings acknowledged | {live.acknowledged} | {frozen.acknowledged} |",
        f"| ratings/s (each after a GET /recommend) | {live.ratings_per_s:.1f} | {frozen.ratings_per_s:.1f} |",
        f"| GET /recommend p50 / p99 ms | {live.recommend.percentile(50):.1f} / {live.recommend.percentile(99):.1f} "
        f"| {frozen.recommend.percentile(50):.1f} / {frozen.recommend.percentile(99):.1f} |",
        f"| POST /ratings p50 / p99 ms | {live.post.percentile(50):.1f} / {live.post.percentile(99):.1f} "
        f"| {frozen.post.percentile(50):.1f} / {frozen.post.percentile(99):.1f} |",
        "",
        f"- Freshness ({len(fresh.delays_s)} users; {fresh.skipped} skipped): p50 {fresh.percentile_ms(50):.1f} ms, "
        f"p99 {fresh.percentile_ms(99):.1f} ms, max {1000 * max(fresh.delays_s, default=float('nan')):.1f} ms; "
        f"{fresh.stale_reads} reads after an acknowledgement still showed the rated movie.",
        f"- Ingestion: paced, {paced.acknowledged:,} ratings acknowledged in {paced.seconds:.1f} s = "
        f"{paced.ratings_per_s:,.0f}/s; back to back, {ingested.acknowledged:,} in {ingested.seconds:.1f} s = "
        f"{ingested.ratings_per_s:,.0f}/s; batches of {ingested.batch}; "
        f"{paced.retried_batches + ingested.retried_batches} batches retried; "
        + "; ".join(f"{mode} store: {c.held:,} held, {c.lost} lost, {c.duplicated} duplicated, {c.unacknowledged} "
                    f"held without an acknowledgement" for mode, c in run.checks.items()) + "; "
        + "; ".join(f"{mode}: {sum(ledger.rejected.values())} rejected, {ledger.failed} failed"
                    for mode, ledger in run.ledgers.items()) + ".",
        f"- Fold-in of {run.fold_in_ratings} ratings ({len(run.fold_in_ms)} runs, one torch thread, users with that "
        f"many ratings, their latest): p50 {fold_p50:.2f} ms, p99 {fold_p99:.2f} ms, max {max(run.fold_in_ms):.2f} ms.",
        "",
        "| requests | path | clients | offered req/s | requests | errors | seconds | req/s | p50 ms | p90 ms | p99 ms "
        "| max ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(p.row() for p in phases),
        "",
    ]


def report(runs: list[ModelRun], args, command: list[str], relevant: float, serve_conf: ServeConfig,
           load_before: tuple, replayed: list[list[ReplayedRating]]) -> str:
    return "\n".join([
        "# Live ratings: prequential replay, freshness, ingestion, fold-in",
        "",
        f"Written by `python -m jobs.bench_feedback {' '.join(command)}`".rstrip() + " (`make bench-feedback`) on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        machine_line(load_before) + " Clients, Ray Serve's proxy, replicas and the ratings store all run on it, over "
        "loopback.",
        f"- Served as `make serve` serves (conf/serve.yaml, `serving.runtime.running`) with {REPLICAS} replicas "
        f"(min = max), {serve_conf.cpus_per_replica:g} CPU each, ingress `{serve_conf.ingress}`, each model twice: "
        "serve.live_updates=true (replay, then freshness, then ingestion) and false (the replay), each time on a "
        "fresh temporary SQLite ratings store; phases start once the replicas have warmed their users.",
        f"- Replay: {sum(map(len, replayed)):,} test ratings (the seed split's: each user's latest) of {len(replayed)} "
        "users, each "
        f"user's in time order on one of {args.clients} clients; before each rating GET /recommend?k=10, then POST "
        "/ratings of it. HR@10: the share of relevant ratings whose movie was in the list shown just before; "
        "NDCG@10: the mean of 1/log2(rank + 1) over them (0 for a miss).",
        f"- Freshness: per user, POST /ratings of the top movie of their list, then GET /recommend back to back until "
        f"{args.fresh_reads} answers in a row leave it out (at most {args.fresh_limit_s:g} s): the time from the "
        "acknowledgement to the answer of the first of them, one request's latency included. Ray Serve's proxy "
        "picks the replica of each read (it cannot be chosen), so the run of reads spreads over both replicas and "
        f"the figure bounds the slower one; {args.clients} clients at once.",
        f"- Ingestion: {args.clients} clients posting batches of {args.batch} random valid ratings (known users and "
        f"movies, the dataset's rating values, new event ids) for {args.seconds:g} s twice: paced to offer "
        f"{args.ingest_rate:,.0f} ratings/s in all (the target's rate, with room), then back to back (the most the "
        "service takes in), "
        f"{RETRY_SHARE:.0%} of the batches posted again as they were (each must answer duplicate), while one more "
        "client reads random users' lists. Then the store is read directly (`RatingsStore.ratings()`) and compared "
        "with every event acknowledged in the session.",
        "- Fold-in: in this process, the model version loaded as the app loads it, `Recommender.fold_in` on one torch "
        "thread as a replica runs it.",
        "- Latency is measured by the client (a minimal keep-alive HTTP/1.1 client, `workflows.http_load`) from "
        "sending to the end of the answer.",
        "",
        *(line for run in runs for line in section(run, relevant)),
    ])


def main(argv: list[str] | None = None) -> int:
    p = override_parser(__doc__.splitlines()[0])
    p.add_argument("--model-uri", action="append", default=None,
                   help="models:/<name>@<alias> or models:/<name>/<version>, once per model measured "
                        "(default: serve.model_uri from conf/serve.yaml)")
    p.add_argument("--users", type=int, default=None, help="replay this many random users (default: all)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--fresh-users", type=int, default=200)
    p.add_argument("--fresh-reads", type=int, default=5, help="reads in a row that must leave the rated movie out")
    p.add_argument("--fresh-limit-s", type=float, default=10.0, help="how long one user's reads may take")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the ingestion lasts")
    p.add_argument("--batch", type=int, default=100, help="ratings per POST /ratings during the ingestion")
    p.add_argument("--ingest-rate", type=float, default=2200.0,
                   help="ratings/s the paced ingestion offers (the target, 2,000/s, with 10%% room)")
    p.add_argument("--fold-in-runs", type=int, default=200)
    p.add_argument("--fold-in-ratings", type=int, default=100)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    for name in ("users", "clients", "fresh_users", "fresh_reads", "fresh_limit_s", "seconds", "batch", "ingest_rate",
                 "fold_in_runs", "fold_in_ratings"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    load_before = os.getloadavg()
    config = load_config(args.overrides, preset=args.preset)
    tracking_uri = mlflow_tracking.tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    data = load_movielens(config.data)
    replayed = ratings_to_replay(data, args.users, seed=0)
    command = sys.argv[1:] if argv is None else argv
    relevant = config.evaluation.relevant_rating
    runs = []
    for model_uri in args.model_uri or [config.serve.model_uri]:
        runs.append(bench_model(model_uri, args, data, replayed, relevant, tracking_uri))
        # Written after each model: a run stopped later keeps what it measured.
        write_atomically(args.out, report(runs, args, command, relevant, config.serve, load_before, replayed),
                         "report")
        print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
