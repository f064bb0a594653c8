"""Two champion gates at once (two sweeps finishing together), in two processes against a real store (SQLite,
and the tracking server of platform/mlflow-server.sh): whatever the interleaving, both versions stay registered
and `champion` ends on the better one. The interleavings are forced with barriers and events around each
process's first alias write, the moment a read-compare-set gate goes wrong."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
from dataclasses import dataclass

import pytest
from mlflow import MlflowClient

from ncf.integrations import mlflow_tracking

pytestmark = pytest.mark.integration

METRIC = "val_full_ndcg_at_10"  # higher is better
BETTER, WORSE = 0.13, 0.11
WAIT_S = 60  # no step waits longer: a broken gate fails the assertions instead of hanging


@dataclass
class Store:
    uri: str
    experiment_id: str


@pytest.fixture(scope="module", params=["sqlite", "server"])
def store(request, tmp_path_factory) -> Store:
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("server").url
    client = MlflowClient(uri, uri)
    return Store(uri, client.create_experiment("concurrent-gates"))


def register_two(store: Store, name: str) -> tuple[str, str]:
    """Two versions of a new registered model, each from its own run: (better, worse)."""
    client = MlflowClient(store.uri, store.uri)
    client.create_registered_model(name)
    versions = []
    for value in (BETTER, WORSE):
        run = client.create_run(store.experiment_id)
        client.log_metric(run.info.run_id, METRIC, value)
        versions.append(str(client.create_model_version(name, f"runs:/{run.info.run_id}/model",
                                                        run.info.run_id).version))
    return versions[0], versions[1]


def _do(steps: list[tuple[str, str]], sync: dict) -> None:
    for action, name in steps:
        if action == "set":
            sync[name].set()
        elif action == "wait":
            sync[name].wait(WAIT_S)
        else:  # "meet": a barrier of both processes
            sync[name].wait(WAIT_S)


def gate_worker(uri: str, tasks, results, sync: dict) -> None:
    """A process that runs one gate per task (name, version, value, script, key) until it gets None; `script`
    says what to set or wait for (among `sync[key]`) at the gate's start, around its first alias write, and
    at its end. One process per side for the whole module: starting processes (importing MLflow) is slow."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    real_write = MlflowClient.set_registered_model_alias
    current: dict = {}

    def write(self, *args, **kwargs):
        if not current.pop("first", False):
            return real_write(self, *args, **kwargs)
        _do(current["script"].get("before_write", []), current["sync"])
        done = real_write(self, *args, **kwargs)
        _do(current["script"].get("after_write", []), current["sync"])
        return done

    MlflowClient.set_registered_model_alias = write
    while (task := tasks.get()) is not None:
        name, version, value, script, key = task
        current.update(first=True, script=script, sync=sync[key])
        try:
            _do(script.get("start", []), sync[key])
            decision = mlflow_tracking.promote_if_better(name, version, value, METRIC, lower_is_better=False,
                                                         client=MlflowClient(uri, uri))
            results.put((version, decision))
        except BaseException as err:
            results.put((version, repr(err)))
        finally:
            _do(script.get("end", []), sync[key])


# Each scenario: the better gate's script, the worse gate's script.
SCENARIOS = {
    # Both read the (absent) champion before either writes the alias; the worse writes last.
    "both read before either writes, worse writes last": (
        {"before_write": [("meet", "barrier")], "after_write": [("set", "better_wrote")]},
        {"before_write": [("meet", "barrier"), ("wait", "better_wrote")]},
    ),
    # The worse gate reads before the better one even starts, and writes after it has finished.
    "worse reads first and writes after better finished": (
        {"start": [("wait", "worse_ready")], "end": [("set", "better_done")]},
        {"before_write": [("set", "worse_ready"), ("wait", "better_done")]},
    ),
    # The mirror image: the better gate's write is the stale one that lands last.
    "better reads first and writes after worse finished": (
        {"before_write": [("set", "better_ready"), ("wait", "worse_done")]},
        {"start": [("wait", "better_ready")], "end": [("set", "worse_done")]},
    ),
}


REPEATS = (1,)  # the interleavings are forced, not left to chance: once each is enough
EVENTS = ("better_wrote", "worse_ready", "better_done", "better_ready", "worse_done")


@dataclass
class Gates:
    """The two gate processes (the better version's side, the worse one's) and what they share."""

    tasks: tuple  # a queue per side
    results: object
    sync: dict  # per test key: the barrier and the events


@pytest.fixture(scope="module")
def gates(store: Store) -> Gates:
    ctx = multiprocessing.get_context("spawn")
    sync = {f"{scenario}/{repeat}": {"barrier": ctx.Barrier(2)} | {event: ctx.Event() for event in EVENTS}
            for scenario in SCENARIOS for repeat in REPEATS}
    tasks, results = (ctx.Queue(), ctx.Queue()), ctx.Queue()
    processes = [ctx.Process(target=gate_worker, args=(store.uri, side, results, sync)) for side in tasks]
    for process in processes:
        process.start()
    yield Gates(tasks, results, sync)
    for side in tasks:
        side.put(None)
    for process in processes:
        process.join(timeout=WAIT_S)
        if process.is_alive():
            process.kill()
            process.join()


@pytest.mark.parametrize("repeat", REPEATS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_gates_at_once_leave_the_better_version_champion(store: Store, gates: Gates, scenario: str,
                                                             repeat: int):
    name = f"gates-{list(SCENARIOS).index(scenario)}-{repeat}"
    better, worse = register_two(store, name)
    better_script, worse_script = SCENARIOS[scenario]
    key = f"{scenario}/{repeat}"
    gates.tasks[0].put((name, better, BETTER, better_script, key))
    gates.tasks[1].put((name, worse, WORSE, worse_script, key))
    decisions = {}
    with contextlib.suppress(queue.Empty):
        for _ in range(2):
            version, decision = gates.results.get(timeout=3 * WAIT_S)
            decisions[version] = decision
    assert set(decisions) == {better, worse}, decisions
    assert all(isinstance(d, dict) for d in decisions.values()), decisions

    client = MlflowClient(store.uri, store.uri)
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'")) == sorted([better, worse])
    assert str(client.get_model_version_by_alias(name, "champion").version) == better, decisions
    assert decisions[better]["champion.decision"] == "promoted"
    assert decisions[worse]["champion.decision"] == "kept"
    assert (decisions[worse]["champion.incumbent_version"], decisions[worse]["champion.incumbent_value"]) == (
        better, f"{BETTER:.6f}")
    for version, value in ((better, BETTER), (worse, WORSE)):  # each entered the gate with its figure
        tags = client.get_model_version(name, version).tags
        assert float(tags[mlflow_tracking.entry_tag(METRIC)]) == value
