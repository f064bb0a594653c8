"""The online experiment over real HTTP, a real ratings store and a real MLflow registry: one app for the module,
following a registered model of its own (copies of the session's champion, so promotions here move no other
module's champion). Each test starts an experiment by setting the `challenger` alias, as make retrain does."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone

import httpx
import pytest
from mlflow import MlflowClient

from jobs import promote
from ncf.config import load_config
from ncf.experiment import CHALLENGER, CHAMPION, variant_of
from ncf.integrations import experiments, mlflow_tracking
from ncf.online_metrics import OFFLINE_GATE_PASSED
from ncf.ports import free_port

pytestmark = pytest.mark.integration

NAME = "ncf-experiment-test"
SETTINGS = [f"serve.model_uri=models:/{NAME}@champion", "serve.poll_interval_s=0.5", "serve.warm_users=10",
            "serve.min_replicas=1", "serve.max_replicas=1", "serve.experiment.share=0.5",
            "serve.experiment.log_interval_s=1", "serve.experiment.margin=0.05"]
USERS = range(1, 121)  # users of ml-latest-small
WAIT_S = 60


def copies_of_the_champion(model_store, name: str, versions: int) -> MlflowClient:
    """The session's store with registered model `name`: versions 1 to `versions`, copies of the session's champion,
    version 1 `name`'s champion. A model of the module's own: its aliases can move."""
    client = MlflowClient(model_store.uri, model_store.uri)
    for _ in range(versions):
        client.copy_model_version(f"models:/{mlflow_tracking.MODEL_NAME}/{model_store.champion}", name)
    client.set_registered_model_alias(name, CHAMPION, "1")
    return client


@pytest.fixture(scope="module")
def client(model_store) -> MlflowClient:
    return copies_of_the_champion(model_store, NAME, 4)


@pytest.fixture(scope="module")
def url(client, model_store) -> Iterator[str]:
    from serving.runtime import running

    with running(load_config([f"serve.port={free_port()}", *SETTINGS]).serve, model_store.uri) as served:
        yield served


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as http:
        yield http


def wait_for(check, what: str):
    deadline = time.monotonic() + WAIT_S
    while not (found := check()):
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.25)
    return found


def start(client: MlflowClient, http: httpx.Client, challenger: str, gate: str = OFFLINE_GATE_PASSED) -> dict:
    """Set the challenger alias on a version tagged with make retrain's verdict; the experiment once it runs."""
    client.set_model_version_tag(NAME, challenger, experiments.OFFLINE_GATE_TAG, gate)
    client.set_registered_model_alias(NAME, CHALLENGER, challenger)
    champion = client.get_model_version_by_alias(NAME, CHAMPION).version
    wanted = f"{champion}-vs-{challenger}"
    return wait_for(lambda: (e := http.get("/experiment").json())["experiment_id"] == wanted and e, wanted)


def serve_everyone(http: httpx.Client, experiment_id: str) -> dict[int, dict]:
    """Each user's /recommend answer, asked twice (the second is replayed): both the same, from their variant."""
    answers = {}
    for user in USERS:
        first, again = (http.get("/recommend", params={"user_id": user, "k": 5}) for _ in range(2))
        assert first.status_code == again.status_code == 200 and first.content == again.content
        answers[user] = body = first.json()
        assert body["variant"] == variant_of(experiment_id, user, 0.5), user
        assert body["rec_id"].startswith(f"{body['model_version']}.{user}.")
    return answers


def recorded(http: httpx.Client, answers: dict[int, dict]) -> None:
    """Until GET /experiment counts every list of `answers`: they reach the store in batches, off the request path."""
    wanted = Counter(a["variant"] for a in answers.values())
    wait_for(lambda: all((http.get("/experiment").json()[variant] or {}).get("lists_served", 0) >= n
                         for variant, n in wanted.items()), "every served list recorded")


def rate(http: httpx.Client, answers: dict[int, dict], variant: str, value: float, tag: str) -> None:
    """Each user of `variant` rates the first movie of their list, with the list's rec_id."""
    ratings = [{"event_id": f"{tag}-{user}", "user_id": user, "movie_id": a["items"][0]["movie_id"],
                "rating": value, "rec_id": a["rec_id"]} for user, a in answers.items() if a["variant"] == variant]
    assert {r["status"] for r in http.post("/ratings", json={"ratings": ratings}).json()["results"]} == {"stored"}


class Hammer:
    """8 client threads asking /recommend of random users until stopped: the requests that did not get a 200."""

    def __init__(self, url: str, threads: int = 8):
        self.url, self.stop, self.failed, self.done = url, threading.Event(), [], 0
        self.threads = [threading.Thread(target=self._ask, args=(seed,)) for seed in range(threads)]

    def _ask(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stop.is_set():
                try:
                    answer = http.get("/recommend", params={"user_id": rng.choice(USERS), "k": 10})
                    if answer.status_code != 200:
                        self.failed.append(answer.status_code)
                except httpx.HTTPError as err:
                    self.failed.append(repr(err))
                self.done += 1

    def __enter__(self) -> Hammer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(WAIT_S)


def test_no_experiment_answers_champion_and_says_so(http: httpx.Client):
    body = http.get("/recommend", params={"user_id": 1}).json()
    assert (body["variant"], body["model_version"]) == (CHAMPION, "1")
    state = http.get("/experiment").json()
    assert state["running"] is False and state["experiment_id"] is None and state["champion"] is None


def test_the_split_is_sticky_ratings_are_attributed_and_the_metrics_go_to_mlflow(client, http):
    state = start(client, http, "2")
    assert state["running"] and state["mode"] == "split" and state["share"] == 0.5
    answers = serve_everyone(http, "1-vs-2")
    sides = [a["variant"] for a in answers.values()]
    assert 0.3 < sides.count(CHALLENGER) / len(sides) < 0.7
    assert {a["model_version"] for a in answers.values() if a["variant"] == CHALLENGER} == {"2"}
    user = next(u for u, a in answers.items() if a["variant"] == CHALLENGER)
    movie = answers[user]["items"][0]["movie_id"]
    assert http.get("/explain", params={"user_id": user, "movie_id": movie}).json()["model_version"] == "2"
    assert serve_everyone(http, "1-vs-2") == answers  # the same side and list on every request

    # A rating of a shown movie with the list's rec_id counts for its variant; one of a movie not shown does not.
    shown = {i["movie_id"] for i in answers[user]["items"]}
    other = next(i["movie_id"] for a in answers.values() for i in a["items"] if i["movie_id"] not in shown)
    rec_id = answers[user]["rec_id"]
    http.post("/ratings", json={"ratings": [
        {"event_id": "attributed", "user_id": user, "movie_id": movie, "rating": 5.0, "rec_id": rec_id},
        {"event_id": "not-shown", "user_id": user, "movie_id": other, "rating": 5.0, "rec_id": rec_id},
    ]}).raise_for_status()
    state = wait_for(lambda: (e := http.get("/experiment").json())["challenger"]["lists_served"] == sides.count(
        CHALLENGER) and e["champion"]["lists_served"] == sides.count(CHAMPION) and e, "every list recorded")
    challenger, champion = state["challenger"], state["champion"]
    assert (challenger["ratings_attributed"], challenger["positive_lists"]) == (1, 1)
    assert champion["ratings_attributed"] == 0 and challenger["mean_rating"]["estimate"] == 5.0
    assert challenger["positive_rate"]["low"] <= challenger["positive_rate"]["estimate"] == 1 / sides.count(CHALLENGER)
    assert state["positive_rate_difference"]["estimate"] > 0

    # One parent run for the experiment, a nested run per variant with the same metric names.
    def variant_runs():
        where = client.get_experiment_by_name(experiments.RUNS_EXPERIMENT)
        runs = client.search_runs([where.experiment_id], f"tags.`{experiments.EXPERIMENT_TAG}` = '1-vs-2'") \
            if where else []
        nested = [r for r in runs if r.data.tags.get(experiments.VARIANT_TAG) and r.data.metrics]
        return len(runs) == 3 and len(nested) == 2 and runs
    runs = wait_for(variant_runs, "the experiment's runs in MLflow")
    parent = next(r for r in runs if experiments.VARIANT_TAG not in r.data.tags)
    nested = {r.data.tags[experiments.VARIANT_TAG]: r for r in runs if r is not parent}
    assert {r.data.tags["mlflow.parentRunId"] for r in nested.values()} == {parent.info.run_id}
    assert set(nested[CHAMPION].data.metrics) == set(nested[CHALLENGER].data.metrics) >= {
        "lists_served", "ratings_attributed", "rated_list_rate", "positive_share", "positive_rate",
        "positive_rate_low", "positive_rate_high", "movies_shown", "catalogue_coverage"}
    assert "positive_rate_difference" in parent.data.metrics


def promote_under_load(url: str, http: httpx.Client, champion_after: str) -> str:
    """`make promote` while 8 clients ask for recommendations until Serve follows the decision: its output."""
    with Hammer(url) as hammer:
        time.sleep(1)
        assert promote.main(["--set", SETTINGS[0], "--set", "serve.experiment.margin=0.05"]) == 0
        wait_for(lambda: not http.get("/experiment").json()["running"]
                 and http.get("/recommend", params={"user_id": 1}).json()["model_version"] == champion_after,
                 "Serve follows the decision")
        time.sleep(1)
    assert hammer.done > 50 and hammer.failed == [], hammer.failed[:5]
    return champion_after


def test_a_better_challenger_is_promoted_without_a_failed_request(client, http, url):
    start(client, http, "3")  # the experiment 1-vs-3
    answers = serve_everyone(http, "1-vs-3")
    rate(http, answers, CHALLENGER, 5.0, "promote")
    recorded(http, answers)
    before = datetime.now(timezone.utc).isoformat(timespec="seconds")
    promote_under_load(url, http, "3")
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "3"
    assert experiments.alias_version(NAME, CHALLENGER, client) is None
    for version in ("1", "3"):
        tags = client.get_model_version(NAME, version).tags
        assert tags["experiment.decision"] == "promote" and tags["experiment.id"] == "1-vs-3"
        assert float(tags["experiment.positive_rate_difference"]) > 0
    assert http.get("/version").json()["loaded_at"] < before  # the challenger as loaded, not loaded again
    answer = http.get("/recommend", params={"user_id": 2}).json()
    assert (answer["variant"], answer["model_version"]) == (CHAMPION, "3")


def test_a_worse_challenger_is_rolled_back_without_a_failed_request(client, http, url):
    start(client, http, "4")  # the experiment 3-vs-4
    answers = serve_everyone(http, "3-vs-4")
    rate(http, answers, CHAMPION, 5.0, "rollback-champion")
    rate(http, answers, CHALLENGER, 1.0, "rollback-challenger")
    recorded(http, answers)
    promote_under_load(url, http, "3")
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "3"
    assert experiments.alias_version(NAME, CHALLENGER, client) is None
    tags = client.get_model_version(NAME, "4").tags
    assert tags["experiment.decision"] == "rollback" and float(tags["experiment.positive_rate_difference"]) < 0
    run = client.search_runs([client.get_experiment_by_name(experiments.RUNS_EXPERIMENT).experiment_id],
                             f"tags.`{experiments.EXPERIMENT_TAG}` = '3-vs-4' and tags.`experiment.decision` = "
                             "'rollback'")
    assert len(run) == 1 and run[0].info.status == "FINISHED"


def test_a_challenger_that_failed_the_offline_gate_is_rolled_back_whatever_its_online_figures(client, http):
    start(client, http, "1", gate="failed")  # the experiment 3-vs-1
    answers = serve_everyone(http, "3-vs-1")
    rate(http, answers, CHALLENGER, 5.0, "gate")
    recorded(http, answers)
    assert promote.main(["--set", SETTINGS[0]]) == 0
    tags = client.get_model_version(NAME, "1").tags
    assert tags["experiment.decision"] == "rollback" and "offline gate is failed" in tags["experiment.reason"]
    assert float(tags["experiment.positive_rate_difference"]) > 0
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "3"
    assert promote.main(["--set", SETTINGS[0]]) == 0  # nothing runs: nothing to decide
