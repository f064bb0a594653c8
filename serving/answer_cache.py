"""The answer replay cache (serve.answer_cache_mb): the bytes of each /recommend answer a replica gave under the
model version serving now, answered again to the same query string in front of FastAPI."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ReplayedAnswers:
    """The replica's ASGI app: `app` behind a cache of its /recommend answers. A GET /recommend without a body whose
    query string `app` has answered with 200 under the model version serving now gets the same status, headers and
    body again, with no routing, validation or serialisation (FastAPI's share of a warm request costs more than the
    app's own); anything else goes to `app`. Holds the most recently asked for answers up to serve.answer_cache_mb,
    and starts empty with each new model version. Outside `app`, not one of its middlewares: Starlette's own layers
    would cost a replayed answer a tenth of its throughput.

    `replica()` is the replica answering the request: the model version it serves (`served`, told apart by identity)
    and its `config` (a ServeConfig)."""

    PATH = "/recommend"

    def __init__(self, app: ASGIApp, replica: Callable[[], Any]):
        self.app, self.replica = app, replica
        self.version = None  # the model version (ServedVersion) the answers come from
        self.answers: OrderedDict[bytes, tuple[Message, Message]] = OrderedDict()  # query string -> start, body
        self.size = 0  # bytes of the answers' bodies and query strings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._replayable(scope):
            await self.app(scope, receive, send)
            return
        replica = self.replica()
        served, query = replica.served, scope["query_string"]
        if served is not self.version:
            self.version, self.size = served, 0
            self.answers.clear()
        answer = self.answers.get(query)
        if answer is not None:
            self.answers.move_to_end(query)
            for message in answer:
                await send(dict(message))
            return
        answer = []

        async def recorded(message: Message) -> None:
            answer.append(message)
            await send(message)

        await self.app(scope, receive, recorded)
        # Kept when complete (one start, one final body) and still from the version serving now.
        if (len(answer) == 2 and answer[0]["status"] == 200 and not answer[1].get("more_body")
                and self.version is served is replica.served):
            self._keep(query, answer[0], answer[1], int(replica.config.answer_cache_mb * 2**20))

    def __getattr__(self, name: str):
        """Everything else is `app`'s: Ray Serve names each request's route (its metrics, its access log) from the
        ASGI app's `routes`, `router` and `root_path`."""
        if name == "app":  # not set yet (while unpickling): no recursion through self.app
            raise AttributeError(name)
        return getattr(self.app, name)

    def held(self, served: object) -> int:
        """How many answers of `served` are held."""
        return len(self.answers) if served is self.version else 0

    def _replayable(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "GET":
            return False
        path, root = scope["path"], scope.get("root_path", "")
        if (path[len(root):] if root and path.startswith(root) else path) != self.PATH:
            return False
        return not any(name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"])

    def _keep(self, query: bytes, start: Message, body: Message, limit: int) -> None:
        size = len(query) + len(body.get("body", b""))
        if size > limit or query in self.answers:  # two first requests for one query: both answered, one kept
            return
        self.answers[query] = (start, body)
        self.size += size
        while self.size > limit:
            dropped, (_, old) = self.answers.popitem(last=False)
            self.size -= len(dropped) + len(old.get("body", b""))
