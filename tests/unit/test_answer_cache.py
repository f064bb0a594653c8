"""The replayed answers (serving.answer_cache) when another request changes the cache while one waits for the
ratings store: the waiting request is answered afresh, never from an answer no longer held."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serving.answer_cache import ReplayedAnswers
from serving.routes import ANSWERED

pytestmark = pytest.mark.unit


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
