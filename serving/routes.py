"""The HTTP API: the FastAPI app (`api`), its error answers and its handlers, and the web page.

The handlers are module functions that look up the replica answering (`current_replica`), not methods of the
deployment class: Serve's class-based routes would inject it through a per-request dependency and a second router
layer, which cost a warm /recommend more CPU than the handler itself. Handlers that compute (explain, predict,
history, search) are plain `def`, which FastAPI runs in its thread pool, so the event loop stays free for cached
answers.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from ncf.feedback_store import StoreUnavailable
from ncf.online_metrics import stored_metrics
from ncf.recommender import UnknownIdError
from serving.body_limit import BodyLimit
from serving.feedback_routes import RETRY_AFTER_S, STORE_DOWN, router
from serving.live_ratings import live_movies
from serving.replica import current_replica
from serving.schemas import (
    MAX_ID,
    MAX_K,
    ErrorOut,
    ExperimentOut,
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

PAGE = Path(__file__).parent / "static" / "index.html"
ANSWERED = "ncf.answered"  # request state: the user and live rating a /recommend answer was computed for

UserId = Annotated[int, Query(ge=0, le=MAX_ID, description="MovieLens userId")]
MovieId = Annotated[int, Query(ge=0, le=MAX_ID, description="MovieLens movieId")]
ERRORS = {404: {"model": ErrorOut, "description": "unknown id"}} | STORE_DOWN

# FastAPI's native OpenTelemetry off: Ray Serve already measures every request, and FastAPI would otherwise
# check on every request whether OpenTelemetry has been configured.
NO_TELEMETRY = {"tracing": False, "metrics": False, "logs": False}
# Every error the app answers is a JSON `{"error": ...}` (ErrorOut), and these two can come from any operation.
api = FastAPI(title="NCF movie recommender",
              description="Recommendations and explanations from the champion NCF model (MovieLens ids).",
              responses={413: {"model": ErrorOut, "description": "request body over serve.max_body_bytes"},
                         422: {"model": ErrorOut, "description": "invalid request: parameters or body"}},
              telemetry=NO_TELEMETRY)


# ----------------------------------------------------------------------------- error answers


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
    headers = exc.headers
    if exc.status_code == 405:  # Starlette names the methods of one route; a path may have several (/users)
        headers = {"Allow": ", ".join(sorted({method for pattern, methods in _documented_methods()
                                              if pattern.match(request.url.path) for method in methods}))}
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)


@cache
def _documented_methods() -> list[tuple[re.Pattern, set[str]]]:
    """Each path of the OpenAPI schema (as a pattern) with the methods it documents."""
    return [(compile_path(path)[0], {method.upper() for method in operations})
            for path, operations in api.openapi()["paths"].items()]


@api.exception_handler(UnknownIdError)
async def _unknown(request: Request, exc: UnknownIdError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=404)


@api.exception_handler(StoreUnavailable)
async def _store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
    """The ratings store cannot answer: nothing was acknowledged; the client should retry."""
    return JSONResponse({"error": f"the ratings store is unavailable ({exc}); retry later"}, status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S)})


@api.exception_handler(Exception)
async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """A bug answers with a JSON error, never a traceback (the traceback goes to the replica's log)."""
    return JSONResponse({"error": f"internal error ({type(exc).__name__}) on {request.url.path}"}, status_code=500)


def _replica_body_limit() -> int:
    """serve.max_body_bytes of the replica answering (its config arrives after the app is built)."""
    return current_replica().config.max_body_bytes


api.add_middleware(BodyLimit, limit=_replica_body_limit, refuse=_http_error)
api.include_router(router)


# ----------------------------------------------------------------------------- the handlers


@api.get("/recommend", response_model=RecommendationsOut, responses=ERRORS)
async def recommend(request: Request, user_id: UserId, k: Annotated[int, Query(ge=1, le=MAX_K)] = 10) -> Response:
    """The k best movies the user has not rated, from their dataset and live ratings; a user with neither gets the
    most rated movies (cold start)."""
    # The body is written from pieces serialised once per version (`recommendations_json`), not validated
    # through RecommendationsOut per request: a cached answer is a lookup plus a join.
    replica = current_replica()
    variants = replica.variants
    variant, served = variants.for_user(user_id)
    live = await replica.live_ratings(user_id)
    ranking, stamp, cold = await replica.ranking(served, user_id, live)
    request.scope.setdefault("state", {})[ANSWERED] = (user_id, stamp)  # what the replayed answers check
    if variants.id is not None:  # an experiment runs: record the list (and compute the challenger's in shadow)
        rec_id = replica.served_lists.add(variants, variant, served, user_id, ranking, k, stamp)
        if variants.config.mode == "shadow":
            replica.served_lists.shadow(variants, user_id, k, rec_id,
                                        lambda version: replica.ranking(version, user_id, live))
    return Response(served.recommendations_json(user_id, ranking, k, cold_start=cold, stamp=stamp, variant=variant),
                    media_type="application/json")


@api.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text())


@api.get("/explain", response_model=ExplanationOut, responses=ERRORS)
def explain(user_id: UserId, movie_id: MovieId) -> dict:
    """Why the model rates this movie so for this user: attention weights and the closest liked movies, from their
    dataset and live ratings (by the version that recommends to them: during an experiment, their variant's)."""
    replica = current_replica()
    return replica.variants.for_user(user_id)[1].explain(user_id, movie_id, replica.live_ratings_now(user_id))


@api.post("/predict", response_model=PredictionsOut, responses=ERRORS)
def predict(body: PredictIn) -> dict:
    """Predicted rating, strength and attention weights of each (user, movie) pair; unknown ids are a 404."""
    served = current_replica().served
    frame = served.recommender.predict_pairs([p.user_id for p in body.pairs], [p.movie_id for p in body.pairs])
    return {"model_version": served.version, "predictions": frame.to_dict(orient="records")}


@api.get("/users", response_model=UsersOut)
async def users(limit: Annotated[int, Query(ge=1, le=100_000)] = 1000) -> dict:
    """Known users by id, with their number of ratings (the page's user picker)."""
    served = current_replica().served
    counts = served.recommender.ratings_per_user()
    return {"count": len(counts), "users": [
        {"user_id": int(u), "n_ratings": int(n)}
        for u, n in zip(served.recommender.ids.user_ids[:limit], counts[:limit], strict=True)]}


@api.get("/users/{user_id}/history", response_model=HistoryOut, responses=ERRORS)
def history(user_id: Annotated[int, PathParam(ge=0, le=MAX_ID)]) -> dict:
    """Every rating the service knows of this user, the dataset's and the live ones, most recent first."""
    replica = current_replica()
    served, store = replica.served, replica.store()
    user = served.recommender.user_index(user_id)
    if user is None and not store.registered([user_id]):
        raise UnknownIdError(f"unknown user id(s): [{user_id}]")
    rated = served.recommender.ratings_of(user) if user is not None else None
    entries = [] if rated is None else [
        (int(rated.timestamp[i]), 0, served.movie(rated.movie[i]) | {"rating": float(rated.rating[i]),
                                                                     "timestamp": int(rated.timestamp[i]),
                                                                     "source": "dataset"})
        for i in range(len(rated))]
    live = store.ratings_of(user_id)
    movies = live_movies(served.recommender, live)
    entries += [(r.timestamp, r.seq, served.movie(m) | {"rating": r.rating, "timestamp": r.timestamp, "source": "live"})
                for r, m in zip(live, movies.tolist(), strict=True) if m >= 0]
    entries.sort(key=lambda e: (e[0], e[1]), reverse=True)
    return {"user_id": user_id, "ratings": [entry for *_, entry in entries]}


@api.get("/movies/search", response_model=SearchOut)
def search(q: Annotated[str, Query(min_length=1, max_length=200, pattern=r"\S",
                                   description="part of a title (not blank)")],
           limit: Annotated[int, Query(ge=1, le=MAX_K)] = 20) -> dict:
    """Movies whose title contains `q` (any case, surrounding spaces ignored), most rated first."""
    served = current_replica().served
    # The pattern guarantees a non-space character; Python's strip() also drops a few control characters
    # (U+001C..U+001F) that the pattern does not count as spaces, hence the fallback.
    query = q.strip().lower() or q.lower()
    found = served.recommender.search_titles(query, limit)
    return {"query": q, "movies": [served.movie(m) for m in found]}


@api.get("/version", response_model=VersionOut)
async def version() -> dict:
    """The model version answering now."""
    served = current_replica().served
    return {"model_name": served.name, "model_version": served.version, "run_id": served.run_id,
            "model_uri": f"models:/{served.name}/{served.version}", "loaded_at": served.loaded_at}


@api.get("/healthz", response_model=HealthOut)
async def healthz() -> dict:
    replica = current_replica()
    served = replica.served
    return {"status": "ok", "model_version": served.version, "cached_users": len(served.rankings),
            "cached_answers": replica.app.held(replica.variants)}


@api.get("/experiment", response_model=ExperimentOut, responses=STORE_DOWN)
def experiment() -> dict:
    """The online experiment running now (the model's `challenger` alias beside `champion`): its settings and each
    variant's metrics so far, with 95% intervals, from the ratings store (lists of the last second may not be in
    yet); `running` false when none runs."""
    replica = current_replica()
    variants, config = replica.variants, replica.config.experiment
    answer = {"running": variants.id is not None, "experiment_id": variants.id, "mode": config.mode,
              "share": config.share, "margin": config.margin, "min_lists": config.min_lists,
              "auto_promote": config.auto_promote, "champion": None, "challenger": None,
              "positive_rate_difference": None, "positive_rate_difference_lower": None}
    if variants.id is None:
        return answer
    metrics = stored_metrics(replica.store(), variants.id, variants.versions, config,
                             variants.champion.recommender.ids.n_movies)
    return answer | {name: value for name, value in asdict(metrics).items() if name != "experiment_id"}
