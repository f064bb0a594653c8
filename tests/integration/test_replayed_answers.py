"""`serving.answer_cache.ReplayedAnswers` in front of a small FastAPI app, driven over ASGI in this process: which
answers it keeps, for which model version and state of the user's live ratings, within which size."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request

from ncf.feedback_store import StoreUnavailable
from serving.answer_cache import ReplayedAnswers
from serving.routes import ANSWERED

BODY_BYTES = 400  # each answer's body: user_id, then padding


def counting_app(stamps: dict[int, int] | None = None) -> tuple[FastAPI, list[str]]:
    """A /recommend that answers 404 for user 0 and records every request it answers; it says, as the app's does,
    which user and latest live rating (`stamps`, default none) each answer was computed for."""
    api, answered = FastAPI(), []

    @api.get("/recommend")
    async def recommend(request: Request, user_id: int) -> dict:
        answered.append(f"recommend {user_id}")
        if user_id == 0:
            raise HTTPException(404, "unknown user")
        request.scope.setdefault("state", {})[ANSWERED] = (user_id, (stamps or {}).get(user_id, 0))
        return {"user_id": user_id, "pad": "x" * (BODY_BYTES - 21 - len(str(user_id)))}

    @api.post("/recommend")
    async def post(user_id: int) -> dict:
        answered.append(f"post {user_id}")
        return {}

    return api, answered


class Replica(SimpleNamespace):
    """The replica `ReplayedAnswers` reads: the versions it serves, its config (about 2.5 answers' worth) and each
    user's latest live rating (`stamps`; None: the ratings store is down)."""

    async def live_stamp(self, user_id: int) -> int:
        if self.stamps is None:
            raise StoreUnavailable("down")
        return self.stamps.get(user_id, 0)


@pytest.fixture
def replica():
    return Replica(variants=object(), config=SimpleNamespace(answer_cache_mb=2.5 * (BODY_BYTES + 12) / 2**20),
                   stamps={})


def ask(app: ReplayedAnswers, *requests: tuple[str, str, dict]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [await client.request(method, path, params=params) for method, path, params in requests]

    return asyncio.run(run())


def get(user_id: int) -> tuple[str, str, dict]:
    return "GET", "/recommend", {"user_id": user_id}


def test_a_repeated_query_is_answered_again_with_the_same_bytes(replica):
    api, answered = counting_app()
    app = ReplayedAnswers(api, lambda: replica)
    first, again, other = ask(app, get(1), get(1), get(2))
    assert answered == ["recommend 1", "recommend 2"]
    assert again.status_code == 200 and again.content == first.content and len(first.content) == BODY_BYTES
    assert again.headers["content-type"] == "application/json"
    assert again.headers["content-length"] == str(BODY_BYTES)
    assert other.json()["user_id"] == 2
    assert app.held(replica.variants) == 2


def test_errors_and_requests_with_a_body_always_reach_the_app(replica):
    api, answered = counting_app()
    app = ReplayedAnswers(api, lambda: replica)
    responses = ask(app, get(0), get(0), ("POST", "/recommend", {"user_id": 3}), ("POST", "/recommend", {"user_id": 3}))
    assert [r.status_code for r in responses] == [404, 404, 200, 200]
    assert answered == ["recommend 0", "recommend 0", "post 3", "post 3"]
    assert app.held(replica.variants) == 0


def test_a_new_model_version_starts_without_its_predecessors_answers(replica):
    api, answered = counting_app()
    app = ReplayedAnswers(api, lambda: replica)
    ask(app, get(1))
    old, replica.variants = replica.variants, object()
    ask(app, get(1), get(1))
    assert answered == ["recommend 1", "recommend 1"]
    assert app.held(replica.variants) == 1 and app.held(old) == 0


def test_after_a_new_live_rating_of_its_user_an_answer_is_computed_again(replica):
    api, answered = counting_app(replica.stamps)
    app = ReplayedAnswers(api, lambda: replica)
    ask(app, get(1), get(2), get(1))
    replica.stamps[1] = 7  # user 1 rated a movie: their answer is stale, user 2's is not
    ask(app, get(1), get(2), get(1))
    assert answered == ["recommend 1", "recommend 2", "recommend 1"]
    assert app.held(replica.variants) == 2
    replica.stamps = None  # the store cannot say whether an answer is still true: the app answers
    ask(app, get(2))
    assert answered[-1] == "recommend 2"


def test_beyond_the_size_limit_the_least_recently_asked_for_answer_goes(replica):
    api, answered = counting_app()
    app = ReplayedAnswers(api, lambda: replica)
    ask(app, get(1), get(2), get(1), get(3))  # room for two: 2 is the least recently asked for when 3 comes
    assert app.held(replica.variants) == 2
    ask(app, get(1), get(3), get(2))
    assert answered == ["recommend 1", "recommend 2", "recommend 3", "recommend 2"]


def test_no_answer_is_kept_with_a_zero_limit(replica):
    replica.config.answer_cache_mb = 0
    api, answered = counting_app()
    app = ReplayedAnswers(api, lambda: replica)
    ask(app, get(1), get(1))
    assert answered == ["recommend 1", "recommend 1"] and app.held(replica.variants) == 0


def test_serve_reads_the_apps_routes_through_it():
    api, _ = counting_app()
    assert ReplayedAnswers(api, lambda: None).routes is api.routes


def test_an_answer_dropped_while_its_request_waits_for_the_store_is_computed_again():
    computed = []

    async def app(scope, receive, send):  # the API: answers /recommend, saying whom it answered for
        computed.append(scope["query_string"])
        scope.setdefault("state", {})[ANSWERED] = (1, 0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % len(computed)})

    async def live_stamp(user_id: int) -> int:
        if replica.clear_while_asked:  # another request meanwhile: a new model version cleared the answers
            cache.answers.clear()
        return 0

    replica = SimpleNamespace(variants=object(), config=SimpleNamespace(answer_cache_mb=1), live_stamp=live_stamp,
                              clear_while_asked=False)
    cache = ReplayedAnswers(app, lambda: replica)

    def get() -> bytes:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/recommend", "query_string": b"user_id=1&k=10",
                 "headers": []}
        asyncio.run(cache(scope, None, send))
        assert sent[0]["status"] == 200
        return sent[1]["body"]

    assert get() == b"1" and get() == b"1"  # computed once, then replayed
    replica.clear_while_asked = True
    assert get() == b"2"  # no longer held once the store answered: computed again, not a KeyError
    assert len(computed) == 2
