"""The answer replay cache (serve.answer_cache_mb): the bytes of each /recommend answer a replica gave under the
model version serving now, answered again to the same query string in front of FastAPI while the user's live
ratings are still those the answer was computed from."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ncf.feedback_store import StoreUnavailable
from serving.routes import ANSWERED


class ReplayedAnswers:
    """The replica's ASGI app: `app` behind a cache of its /recommend answers. A GET /recommend without a body whose
    query string `app` has answered with 200 under the model version serving now gets the same status, headers and
    body again, with no routing, validation or serialisation (FastAPI's share of a warm request costs more than the
    app's own); anything else goes to `app`. Holds the most recently asked for answers up to serve.answer_cache_mb,
    and starts empty with each new model version or experiment. An answer is replayed only while its user's latest
    live rating is the one it was computed with (`app` leaves the user and that rating's sequence number in the
    request's state under `ANSWERED`); after a newer rating it is computed again. Outside `app`, not one of its
    middlewares: Starlette's own layers would cost a replayed answer a tenth of its throughput.

    `replica()` is the replica answering the request: the model versions it serves (`variants`, told apart by
    identity: a new champion or challenger starts afresh; within one experiment a user's side never changes, so a
    replayed answer is always their own variant's), its `config` (a ServeConfig) and `live_stamp(user_id)`, the
    user's latest live rating now."""

    PATH = "/recommend"

    def __init__(self, app: ASGIApp, replica: Callable[[], Any]):
        self.app, self.replica = app, replica
        self.variants = None  # the model versions (serving.experiment.Variants) the answers come from
        # query string -> (user id, live rating stamp), start, body
        self.answers: OrderedDict[bytes, tuple[tuple[int, int], Message, Message]] = OrderedDict()
        self.size = 0  # bytes of the answers' bodies and query strings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._replayable(scope):
            await self.app(scope, receive, send)
            return
        replica = self.replica()
        variants, query = replica.variants, scope["query_string"]
        if variants is not self.variants:
            self.variants, self.size = variants, 0
            self.answers.clear()
        answer = self.answers.get(query)
        # Replayed only if, once the store has answered, it is still held: meanwhile another request may have
        # dropped it (room made, a newer answer kept) or a new model version cleared them all.
        if (answer is not None and await self._still_true(replica, *answer[0])
                and self.answers.get(query) is answer):
            self.answers.move_to_end(query)
            for message in answer[1:]:
                await send(dict(message))
            return
        answer = []

        async def recorded(message: Message) -> None:
            answer.append(message)
            await send(message)

        await self.app(scope, receive, recorded)
        # Kept when complete (one start, one final body) and still from the version serving now.
        answered = scope.get("state", {}).get(ANSWERED)
        if (len(answer) == 2 and answer[0]["status"] == 200 and not answer[1].get("more_body") and answered
                and self.variants is variants is replica.variants):
            self._keep(query, answered, answer[0], answer[1], int(replica.config.answer_cache_mb * 2**20))

    def __getattr__(self, name: str):
        """Everything else is `app`'s: Ray Serve names each request's route (its metrics, its access log) from the
        ASGI app's `routes`, `router` and `root_path`."""
        if name == "app":  # not set yet (while unpickling): no recursion through self.app
            raise AttributeError(name)
        return getattr(self.app, name)

    def held(self, variants: object) -> int:
        """How many answers of `variants` are held."""
        return len(self.answers) if variants is self.variants else 0

    def _replayable(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "GET":
            return False
        path, root = scope["path"], scope.get("root_path", "")
        if (path[len(root):] if root and path.startswith(root) else path) != self.PATH:
            return False
        return not any(name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"])

    @staticmethod
    async def _still_true(replica: Any, user_id: int, stamp: int) -> bool:
        """Whether the user's latest live rating is still the one an answer was computed with (a store that
        cannot tell leaves the request to `app`, which says so)."""
        try:
            return await replica.live_stamp(user_id) == stamp
        except StoreUnavailable:
            return False

    def _keep(self, query: bytes, answered: tuple[int, int], start: Message, body: Message, limit: int) -> None:
        size = len(query) + len(body.get("body", b""))
        if size > limit:
            return
        if query in self.answers:  # two first requests for one query, or an answer computed again after a rating
            self._drop(query)
        self.answers[query] = (answered, start, body)
        self.size += size
        while self.size > limit:
            self._drop(next(iter(self.answers)))

    def _drop(self, query: bytes) -> None:
        _, _, body = self.answers.pop(query)
        self.size -= len(query) + len(body.get("body", b""))
