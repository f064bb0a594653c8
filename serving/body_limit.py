"""The request body limit (serve.max_body_bytes): an ASGI middleware that refuses a body over the limit before
anything parses it, so a replica never holds more than the limit of any body."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """A request body over the limit. An HTTPException, so that raised while FastAPI reads a body it is answered
    by the app's error handler like any other error."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes (serve.max_body_bytes)")


class BodyLimit:
    """ASGI middleware: a request body over `limit()` bytes is refused with 413 before anything parses it: at once
    when its Content-Length says so (the body is never read), else (a chunked body) as soon as the bytes read pass
    the limit. `refuse` is the app's handler of HTTP errors, which writes the 413 answer."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int],
                 refuse: Callable[[Request, HTTPException], Awaitable[Response]]):
        self.app, self.limit, self.refuse = app, limit, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        declared = headers.get(b"content-length", b"")
        if not declared and b"transfer-encoding" not in headers:  # neither: no body (HTTP/1.1), nothing to bound
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        if declared.isdigit() and int(declared) > limit:
            await self._refused(BodyTooLarge(limit), scope, receive, send)
            return
        received, started = 0, False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge as exc:  # read outside FastAPI's body parsing: answered here, unless already answering
            if started:
                raise
            await self._refused(exc, scope, receive, send)

    async def _refused(self, exc: BodyTooLarge, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.refuse(Request(scope, receive), exc)
        await response(scope, receive, send)
