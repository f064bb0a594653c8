"""The shadow experiment with auto-promotion, over real HTTP, store and registry: everyone sees the champion's
lists, the challenger's list for each request is recorded beside it, and Serve itself decides once both variants
served serve.experiment.min_lists lists. A registered model of the module's own (copies of the session's champion)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from mlflow import MlflowClient
from test_experiment import USERS, copies_of_the_champion, rate, wait_for

from ncf.config import load_config
from ncf.experiment import CHALLENGER, CHAMPION
from ncf.integrations import experiments
from ncf.online_metrics import OFFLINE_GATE_PASSED
from ncf.ports import free_port

pytestmark = pytest.mark.integration

NAME = "ncf-shadow-test"
MIN_LISTS = len(USERS)


@pytest.fixture(scope="module")
def client(model_store) -> MlflowClient:
    return copies_of_the_champion(model_store, NAME, 2)


@pytest.fixture(scope="module")
def http(client, model_store) -> Iterator[httpx.Client]:
    from serving.runtime import running

    # Identical versions show identical lists: a wide margin lets the tie through.
    settings = [f"serve.port={free_port()}", f"serve.model_uri=models:/{NAME}@champion", "serve.poll_interval_s=0.5",
                "serve.warm_users=10", "serve.min_replicas=1", "serve.max_replicas=1", "serve.experiment.mode=shadow",
                "serve.experiment.auto_promote=true", f"serve.experiment.min_lists={MIN_LISTS}",
                "serve.experiment.margin=0.5", "serve.experiment.log_interval_s=1"]
    with running(load_config(settings).serve, model_store.uri) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


def test_shadow_lists_are_recorded_beside_the_champions_and_serve_promotes_once_both_reach_min_lists(client, http):
    client.set_model_version_tag(NAME, "2", experiments.OFFLINE_GATE_TAG, OFFLINE_GATE_PASSED)
    client.set_registered_model_alias(NAME, CHALLENGER, "2")
    wait_for(lambda: http.get("/experiment").json()["experiment_id"] == "1-vs-2", "the experiment runs")
    answers = {}
    for user in USERS[:-1]:  # one list short of min_lists: nothing is decided yet
        answers[user] = answer = http.get("/recommend", params={"user_id": user, "k": 5}).json()
        assert (answer["variant"], answer["model_version"]) == (CHAMPION, "1")
    rate(http, answers, CHAMPION, 5.0, "shadow")
    state = wait_for(lambda: (e := http.get("/experiment").json())["challenger"]["lists_served"] == MIN_LISTS - 1
                     and e["champion"]["lists_served"] == MIN_LISTS - 1 and e, "the shadow lists recorded")
    # The same model shows the same lists: every rating of a shown movie counts for the shadow list too.
    assert state["champion"]["ratings_attributed"] == state["challenger"]["ratings_attributed"] == MIN_LISTS - 1
    assert state["positive_rate_difference"]["estimate"] == 0
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "1"

    http.get("/recommend", params={"user_id": USERS[-1], "k": 5}).raise_for_status()  # min_lists reached
    wait_for(lambda: experiments.alias_version(NAME, CHALLENGER, client) is None, "Serve decides")
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "2"
    assert client.get_model_version(NAME, "2").tags["experiment.decision"] == "promote"
    wait_for(lambda: http.get("/recommend", params={"user_id": 1}).json()["model_version"] == "2", "Serve follows")
