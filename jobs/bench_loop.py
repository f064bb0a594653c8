"""The whole loop simulated on the seed split: serve, collect ratings, retrain, experiment on live traffic, decide.

    python -m jobs.bench_loop [--rounds 3] [--experiment-rounds 4] [--users N] [--clients 8]
                              [--tracking-uri URI] [--champion-uri URI] [--challenger-uri URI]
                              [--retrain-launcher ray|local] [--out docs/benchmarks/loop.md]
                              [--preset NAME] [--set section.key=value ...]

The held-out test ratings of the seed split stand for what each user would do (`workflows.loop_bench`): in a round
every user asks for their top 10 and rates the shown movies among their held-out ratings, with those ratings.

1. The registry: `--tracking-uri` (default: a fresh store in a temporary folder, since the loop moves the model's
   aliases); its champion, or `--champion-uri`'s version made champion, or, with neither, one trained by
   `python -m jobs.train --preset PRESET` (default recommender).
2. The app as `make serve` runs it (conf/serve.yaml with `--set` overrides, 2 replicas, serve.experiment.share=0.5)
   on a free port with a fresh ratings store; `--rounds` rounds of the simulated users.
3. The challenger: `python -m jobs.retrain` on those ratings (the champion's settings), a separate job as `make
   retrain` runs; or `--challenger-uri`'s version, given the alias `challenger` with its offline gate marked passed
   (the simulation then tests the online decision alone: a deliberately worse model must be rolled back).
4. The experiment at 50% share, as Serve starts it once it sees the alias: `--experiment-rounds` rounds.
5. The decision, as `make promote` takes it (`ncf.integrations.experiments.promote_on_evidence`), while 8 clients
   read recommendations back to back until every answer comes from the version the decision leaves: the failed
   requests during the swap.
The report gives the challenger's fresh-hold-out figures against the champion's (retrained challengers), both
variants' online metrics, the decision and the time of each stage.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from mlflow import MlflowClient

from ncf.config import Config, load_config, override_parser
from ncf.feedback_store import RatingsStore
from ncf.files import write_atomically
from ncf.integrations import experiments, mlflow_tracking
from ncf.ports import free_port
from ncf.prepared import load_movielens
from serving.model_version import resolve_version
from serving.runtime import running
from workflows.benchmarks import machine_line
from workflows.feedback_bench import Ledger, ratings_to_replay
from workflows.loop_bench import (
    Hammered,
    RetrainFigures,
    Round,
    SimulatedUser,
    Stages,
    experiment_started,
    hammer,
    online_lines,
    rounds_lines,
    settled,
    simulate_round,
)

OUT = Path("docs/benchmarks/loop.md")
REPLICAS = 2
SHARE = 0.5
SWAP_CLIENTS = 8


def job_env(args, store_uri: str | None = None) -> dict[str, str]:
    """The environment of the jobs the loop starts: its registry (and ratings store)."""
    return os.environ | {"MLFLOW_TRACKING_URI": args.tracking_uri} | (
        {"NCF_FEEDBACK_URI": store_uri} if store_uri else {})


def overrides_as_args(args) -> list[str]:
    return [a for o in args.overrides for a in ("--set", o)]


def champion_ready(args, client: MlflowClient, name: str, stages: Stages) -> str:
    """The champion's version: `--champion-uri`'s made champion, the store's, or one trained now. A `challenger`
    alias left from before is removed: the loop starts with the champion alone."""
    if experiments.alias_version(name, mlflow_tracking.CHALLENGER, client) is not None:
        client.delete_registered_model_alias(name, mlflow_tracking.CHALLENGER)
    if args.champion_uri:
        version = str(resolve_version(args.champion_uri, client).version)
        client.set_registered_model_alias(name, mlflow_tracking.CHAMPION, version)
        return version
    if mlflow_tracking.champion_version(name, client) is None:
        preset = args.preset or "recommender"
        with stages.timed(f"champion trained (make train PRESET={preset})"):
            subprocess.run([sys.executable, "-m", "jobs.train", "--preset", preset, *overrides_as_args(args)],
                           check=True, env=job_env(args))
    return str(mlflow_tracking.champion_version(name, client).version)


def challenger_ready(args, client: MlflowClient, name: str, store_uri: str, stages: Stages) -> RetrainFigures | None:
    """Give the alias `challenger` to `--challenger-uri`'s version (its offline gate marked passed), or run the
    retrain job; the retrain's figures (None for a given challenger)."""
    if args.challenger_uri:
        version = str(resolve_version(args.challenger_uri, client).version)
        client.set_model_version_tag(name, version, experiments.OFFLINE_GATE_TAG, "passed")
        client.set_model_version_tag(name, version, "challenger.offline_gate_reason",
                                     "marked passed by jobs.bench_loop: the simulation tests the online decision alone")
        client.set_registered_model_alias(name, mlflow_tracking.CHALLENGER, version)
        return None
    newest = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    with stages.timed("retrain (make retrain)"):
        subprocess.run([sys.executable, "-m", "jobs.retrain", "--launcher", args.retrain_launcher,
                        *overrides_as_args(args)], check=True, env=job_env(args, store_uri))
    new = [v for v in client.search_model_versions(f"name = '{name}'") if int(v.version) > newest]
    if not new:
        raise RuntimeError("jobs.retrain registered no version")
    return RetrainFigures.of(client, new[0])


def rounds(base: str, users: list[SimulatedUser], count: int, name: str, args, config: Config, ledger: Ledger,
           stages: Stages) -> list[Round]:
    done = []
    for i in range(1, count + 1):
        with stages.timed(f"{name} round {i}"):
            done.append(asyncio.run(simulate_round(base, users, args.clients, f"{name}-{i}",
                                                   config.evaluation.relevant_rating, ledger)))
        print(f"  {done[-1].posted} ratings posted, answers {dict(done[-1].lists)}, {done[-1].failed} failed",
              flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    p = override_parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of asking and rating before the retrain (0: none, "
                                                         "with --challenger-uri)")
    p.add_argument("--experiment-rounds", type=int, default=4, help="rounds during the experiment")
    p.add_argument("--users", type=int, default=None, help="simulate this many random users (default: all)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tracking-uri", default=None, help="the registry (default: a fresh one in a temporary folder)")
    p.add_argument("--champion-uri", default=None, help="make this version champion first")
    p.add_argument("--challenger-uri", default=None, help="this version as challenger instead of a retrain")
    p.add_argument("--retrain-launcher", choices=("ray", "local"), default="ray")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    for flag in ("experiment_rounds", "users", "clients"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if args.rounds < 0 or (args.rounds == 0 and not args.challenger_uri):
        p.error("--rounds must be positive (0 only with --challenger-uri: a retrain needs ratings)")
    load_before = os.getloadavg()
    command = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="ncf-bench-loop-") as tmp:
        args.tracking_uri = args.tracking_uri or f"sqlite:///{Path(tmp) / 'mlflow' / 'mlflow.db'}"
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # this process's registry too
        try:
            lines = loop(args, Path(tmp))
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI")
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous
    write_atomically(args.out, "\n".join([
        "# The closed loop: serve, collect, retrain, experiment, decide", "",
        f"Written by `python -m jobs.bench_loop {' '.join(command)}`".rstrip() + " (`make bench-loop`) on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
        machine_line(load_before) + " Clients, Ray Serve, the ratings store and the retrain job all run on it.",
        *lines]) + "\n", "report")
    print(f"wrote {args.out}", flush=True)
    return 0


def loop(args, tmp: Path) -> list[str]:
    """Run the loop (module docstring); the record's lines after its machine line."""
    config = load_config([*args.overrides, f"serve.port={free_port()}", f"serve.min_replicas={REPLICAS}",
                          f"serve.max_replicas={REPLICAS}", f"serve.experiment.share={SHARE}"], preset=args.preset)
    mlflow_tracking.setup()
    client = MlflowClient(args.tracking_uri, args.tracking_uri)
    name = mlflow_tracking.model_name(config)
    stages = Stages()
    champion = champion_ready(args, client, name, stages)
    data = load_movielens(config.data)
    users = [SimulatedUser.of(ratings) for ratings in ratings_to_replay(data, args.users, seed=0)]
    store_uri = f"sqlite:///{tmp / 'ratings.db'}"
    ledger = Ledger()
    started = time.perf_counter()
    with running(config.serve, args.tracking_uri, store_uri) as base:
        stages.seconds["app started"] = time.perf_counter() - started
        collected = rounds(base, users, args.rounds, "collect", args, config, ledger, stages)
        retrained = challenger_ready(args, client, name, store_uri, stages)
        now = experiments.running_experiment(name, client)
        if now is None:
            return describe(args, config, data.n_movies, users, stages, collected, retrained, champion)
        with stages.timed("experiment started on every replica"):
            asyncio.run(experiment_started(base, now.id))
        tested = rounds(base, users, args.experiment_rounds, "experiment", args, config, ledger, stages)
        store = RatingsStore(store_uri)
        try:
            outcome = None

            async def decision() -> None:
                nonlocal outcome
                outcome = await asyncio.to_thread(experiments.promote_on_evidence, name, store,
                                                  config.serve.experiment, client, data.n_movies, now)
                if outcome is None:
                    raise RuntimeError(f"the challenger alias of {name} moved during the experiment {now.id}")
                left = now.versions["challenger" if outcome.decision.action == "promote" else "champion"]
                await settled(base, left)

            with stages.timed("decision taken in by every replica"):
                swap = asyncio.run(hammer(base, [u.user_id for u in users], SWAP_CLIENTS, decision))
        finally:
            store.close()
    return describe(args, config, data.n_movies, users, stages, collected, retrained, champion,
                    tested, outcome, swap)


def describe(args, config: Config, catalogue: int, users: list[SimulatedUser], stages: Stages,
             collected: list[Round], retrained: RetrainFigures | None, champion: str, tested: list[Round] | None = None,
             outcome: experiments.Outcome | None = None, swap: Hammered | None = None) -> list[str]:
    """The record: how the loop ran, then each stage's figures."""
    experiment = config.serve.experiment
    lines = [
        f"- Simulated users: the seed split's held-out test ratings of {len(users)} users stand for what they would "
        "do. In each round every user asks for their top 10 (`GET /recommend?k=10`) and rates, in one `POST "
        "/ratings` carrying the answer's rec_id, the shown movies among their held-out ratings not rated yet, with "
        f"those ratings; {args.clients} clients share the users.",
        f"- Served as `make serve` serves (conf/serve.yaml, `serving.runtime.running`) with {REPLICAS} replicas, "
        f"a fresh SQLite ratings store, serve.experiment: share {experiment.share:g}, mode {experiment.mode}, margin "
        f"{experiment.margin:g}, window {experiment.window_s:g} s, positive rating {experiment.positive_rating:g}; "
        f"catalogue {catalogue:,} movies.",
        f"- Champion: version {champion}. Challenger: " + (
            f"version {retrained.version}, retrained by `python -m jobs.retrain` on the collected ratings."
            if retrained else f"`{args.challenger_uri}`, given the alias with its offline gate marked passed "
                              "(the simulation tests the online decision alone)."),
        "- A challenger meets users who have already rated what the champion showed them in the rounds before: its "
        "different movies are new to them, a novelty effect in its favour (as with real users).",
        f"- The swap: the decision as `make promote` takes it, while {SWAP_CLIENTS} clients read recommendations back "
        "to back until 8 answers in a row of /version and /experiment come from the version the decision leaves, "
        "with no experiment: every request of theirs in that time counts.",
        "", "## Stages", "", "| stage | seconds |", "|---|---|",
        *(f"| {stage} | {seconds:.1f} |" for stage, seconds in stages.seconds.items()),
        "", "## Collecting ratings (champion alone)", "",
        *(rounds_lines(collected) if collected else ["No rounds before the challenger (--rounds 0)."]),
    ]
    if retrained:
        lines += ["", "## The retrained challenger (make retrain)", "", *retrained.lines(),
                  "- Here the live ratings are ratings of movies the champion as served showed, so the fresh hold-out "
                  "holds what it chose to show: it favours the champion as served. The frozen champion shows each "
                  "user the list of the first round again, whose held-out movies were all rated before the cut."]
    if outcome is None:
        return [*lines, "", "No experiment ran: the challenger got no `challenger` alias."]
    versions = outcome.running.versions
    left = versions["challenger"] if outcome.decision.action == "promote" else versions["champion"]
    return [
        *lines, "", f"## The experiment ({outcome.running.id}, {experiment.share:.0%} of users on the challenger)",
        "", *rounds_lines(tested), "", "Online metrics when the decision was taken (GET /experiment's figures):", "",
        *online_lines(outcome.metrics, experiment.margin),
        "", "## The decision", "",
        f"**{outcome.decision.action}**: {outcome.decision.reason}. The champion alias is on version {left}; the "
        "challenger alias is removed. The decision and its figures are tagged on both versions and on the "
        f"experiment's MLflow run ({experiments.RUNS_EXPERIMENT}).",
        f"- During the swap: {swap.requests} requests from {SWAP_CLIENTS} clients in {swap.seconds:.1f} s, "
        f"**{swap.failed} failed**.",
    ]


if __name__ == "__main__":
    sys.exit(main())
