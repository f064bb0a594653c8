"""The recommender over HTTP: one Ray Serve deployment behind a FastAPI ingress, and its web page.

`Recommendations` answers from one model version at a time (`Served`). It loads the
version `serve.model_uri` names, then polls that URI and swaps in each new version
once it is loaded and warmed, so no request waits for an update or fails on one.
/recommend answers from a per-version cache of each user's top-100 unseen movies;
users not cached yet are scored together, one catalogue pass per batch (`@serve.batch`).
"""

# No `from __future__ import annotations` here: FastAPI must resolve the handlers' parameter types
# (e.g. `UserId`) at runtime, and Serve's class-based ingress cannot see this module's names to do it.
import asyncio
import logging
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import mlflow
import numpy as np
import ray
import torch
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from ncf import tracking
from ncf.config import MODEL_URI, ServeConfig, load_config
from ncf.data import NO_GENRES, Ratings
from ncf.ranking import top_k_unseen
from ncf.recommender import Recommender, UnknownIdError

APP_NAME = "ncf"
MAX_K = 100  # the API's limit, and the length of each cached ranking
MAX_PAIRS = 10_000
MAX_ID = 2**63 - 1  # ids are int64 inside the model
LIKED = 4.0  # "because you rated" draws from ratings this high (or the user's best, if lower)
BECAUSE_N = 5
PAGE = Path(__file__).parent / "static" / "index.html"
PROXY_GRPC = "RAY_SERVE_PROXY_USE_GRPC"  # see serve.proxy_grpc in conf/serve.yaml
logger = logging.getLogger("ray.serve")


class ModelNotFoundError(LookupError):
    """The model URI points at no registered version."""


def resolve(model_uri: str, client: MlflowClient) -> ModelVersion:
    """The registered version a `models:/name@alias` or `models:/name/version` URI points at now."""
    match = re.match(MODEL_URI, model_uri)
    if match is None:
        raise ValueError(f"model URI {model_uri!r} is neither models:/<name>@<alias> nor models:/<name>/<version>")
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(match["name"], match["alias"])
        return client.get_model_version(match["name"], match["version"])
    except MlflowException as err:
        raise ModelNotFoundError(f"no model version at {model_uri}: {err.message}") from None


# ----------------------------------------------------------------------------- one model version


@dataclass(frozen=True)
class Ranking:
    """Movies best first, with what the model says of each (user, movie) pair."""

    movies: np.ndarray
    rating: np.ndarray
    strength: np.ndarray
    user_weight: np.ndarray
    movie_weight: np.ndarray


class Served:
    """One model version and what is derived from it once: the movie side of scoring, ratings by user,
    popularity. `rankings` fills as users are asked for (or warmed), keeps the `cache_users` most
    recently asked for, and dies with the version, so a new model never answers from its
    predecessor's cache.
    """

    def __init__(self, recommender: Recommender, version: ModelVersion, cache_users: int):
        self.recommender = recommender
        self.cache_users = cache_users
        self.name, self.version, self.run_id = version.name, str(version.version), version.run_id
        self.loaded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        ids, history, movies = recommender.ids, recommender.history, recommender.movies
        order = np.argsort(history.user, kind="stable")
        self.user_start = np.searchsorted(history.user[order], np.arange(ids.n_users + 1))
        self.rated = history.take(order)  # grouped by user: user u's ratings are rows user_start[u]:[u + 1]
        self.titles = movies["title"].tolist()
        self.genres = [[] if g == NO_GENRES else g.split("|") for g in movies["genres"]]
        self.lower_titles = movies["title"].str.lower()
        self.by_popularity = recommender.popular(ids.n_movies)
        counts = np.bincount(history.movie, minlength=ids.n_movies)
        means = np.bincount(history.movie, weights=history.rating, minlength=ids.n_movies) / np.maximum(counts, 1)
        popular = self.by_popularity[:MAX_K]
        lo, hi = recommender.model.cfg.rating_min, recommender.model.cfg.rating_max
        # Cold start: the most rated movies, each at its mean rating; only the movie side speaks.
        self.cold = Ranking(popular, means[popular], (means[popular] - lo) / (hi - lo),
                            np.zeros(len(popular)), np.ones(len(popular)))
        self.movie_side = recommender.model.movie_side()  # the catalogue's half of every scoring pass
        self.rankings: OrderedDict[int, Ranking] = OrderedDict()  # least recently asked for first

    def user_index(self, user_id: int) -> int | None:
        index = int(self.recommender.ids.user_index(np.asarray([user_id]))[0])
        return index if index >= 0 else None

    def ratings_of(self, user: int) -> Ratings:
        return self.rated.take(np.arange(self.user_start[user], self.user_start[user + 1]))

    def cached(self, user: int) -> Ranking | None:
        ranking = self.rankings.get(user)
        if ranking is not None:
            with suppress(KeyError):  # another thread may have just evicted it
                self.rankings.move_to_end(user)
        return ranking

    def rank(self, users: list[int]) -> dict[int, Ranking]:
        """The top-`MAX_K` unseen movies of each user: cached ones as they are, the others in one pass,
        then cached (the least recently asked for make room beyond `cache_users`)."""
        found = {u: r for u in set(users) if (r := self.cached(u)) is not None}
        todo = np.asarray(sorted(set(users) - found.keys()), dtype=np.int64)
        if len(todo) == 0:
            return found
        rec = self.recommender
        movies, scores = top_k_unseen(
            lambda batch: rec.model.score_users(torch.as_tensor(batch), movie_side=self.movie_side),
            todo, rec.seen, MAX_K)
        k = movies.shape[1]
        pairs = rec.scorer.explain(np.repeat(todo, k), movies.ravel())
        for row, user in enumerate(todo):
            unseen = np.isfinite(scores[row])  # fewer than k unseen movies leave -inf at the end
            part = slice(row * k, (row + 1) * k)
            found[int(user)] = self.rankings[int(user)] = Ranking(movies[row][unseen], *(
                pairs[field][part][unseen] for field in ("rating", "strength", "user_weight", "movie_weight")))
        while len(self.rankings) > self.cache_users:
            with suppress(KeyError):  # another thread may have just evicted it
                self.rankings.popitem(last=False)
        return found

    def warm(self, n_users: int, chunk: int = 8) -> None:
        """Rank the `n_users` most active users ahead of their requests."""
        most_active = np.argsort(-np.diff(self.user_start), kind="stable")[:n_users]
        for start in range(0, len(most_active), chunk):
            self.rank(most_active[start: start + chunk].tolist())

    def movie(self, index: int) -> dict:
        return {"movie_id": int(self.recommender.ids.movie_ids[index]), "title": self.titles[index],
                "genres": self.genres[index]}

    def items(self, ranking: Ranking, k: int) -> list[dict]:
        return [self.movie(m) | {"predicted_rating": float(r), "strength": float(s), "user_weight": float(uw),
                                 "movie_weight": float(mw)}
                for m, r, s, uw, mw in zip(ranking.movies[:k], ranking.rating[:k], ranking.strength[:k],
                                           ranking.user_weight[:k], ranking.movie_weight[:k], strict=True)]

    def explain(self, user_id: int, movie_id: int) -> dict:
        """The pair's prediction and attention weights, and the user's liked movies closest to it."""
        rec = self.recommender
        user, movie = int(rec.user_indices([user_id])[0]), int(rec.movie_indices([movie_id])[0])
        out = rec.scorer.explain(np.asarray([user]), np.asarray([movie]))
        rated = self.ratings_of(user)
        liked = rated.take(np.flatnonzero((rated.rating >= min(LIKED, rated.rating.max())) & (rated.movie != movie)))
        similarity = rec.movie_similarity(movie, liked.movie) if len(liked) else np.empty(0)
        closest = np.argsort(-similarity, kind="stable")[:BECAUSE_N]
        genre_counts: dict[str, int] = {}
        for m in liked.movie:
            for genre in self.genres[m]:
                genre_counts[genre] = genre_counts.get(genre, 0) + 1
        shared = sorted((g for g in self.genres[movie] if g in genre_counts), key=lambda g: (-genre_counts[g], g))
        return {
            "user_id": user_id, **self.movie(movie), "model_version": self.version,
            "predicted_rating": float(out["rating"][0]), "strength": float(out["strength"][0]),
            "user_weight": float(out["user_weight"][0]), "movie_weight": float(out["movie_weight"][0]),
            "because_you_rated": [self.movie(liked.movie[i]) | {"rating": float(liked.rating[i]),
                                                                "similarity": float(similarity[i])} for i in closest],
            "shared_genres": shared,
        }


def load_served(version: ModelVersion, cache_users: int) -> Served:
    """Download and load one registered version; its files are read into memory, then deleted."""
    with tempfile.TemporaryDirectory(prefix="ncf-serve-") as tmp:
        model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}", dst_path=tmp)
        return Served(model.unwrap_python_model().recommender, version, cache_users)


# ----------------------------------------------------------------------------- HTTP schema


class Movie(BaseModel):
    movie_id: int
    title: str
    genres: list[str]


class Scored(BaseModel):
    predicted_rating: float = Field(description="rating the model predicts, in the rating range")
    strength: float = Field(description="recommendation strength in [0, 1] (the rating before scaling)")
    user_weight: float = Field(description="attention on the user side; the two weights sum to 1")
    movie_weight: float = Field(description="attention on the movie side")


class Item(Movie, Scored):
    pass


class RecommendationsOut(BaseModel):
    user_id: int
    cold_start: bool = Field(description="unknown user: the most rated movies at their mean rating, "
                                         "user_weight 0, movie_weight 1")
    model_version: str
    items: list[Item]


class BecauseYouRated(Movie):
    rating: float = Field(description="the user's own rating")
    similarity: float = Field(description="cosine similarity of the two movies' representations")


class ExplanationOut(Movie, Scored):
    user_id: int
    model_version: str
    because_you_rated: list[BecauseYouRated]
    shared_genres: list[str] = Field(description="genres of this movie among those the user's liked movies have, "
                                                 "most shared first")


Id = Annotated[int, Field(ge=0, le=MAX_ID)]


class Pair(BaseModel):
    user_id: Id
    movie_id: Id


class PredictIn(BaseModel):
    pairs: list[Pair] = Field(max_length=MAX_PAIRS)


class Prediction(Scored):
    user_id: int
    movie_id: int


class PredictionsOut(BaseModel):
    model_version: str
    predictions: list[Prediction]


class Rated(Movie):
    rating: float
    timestamp: int


class HistoryOut(BaseModel):
    user_id: int
    ratings: list[Rated] = Field(description="most recent first")


class UserSummary(BaseModel):
    user_id: int
    n_ratings: int


class UsersOut(BaseModel):
    count: int = Field(description="known users in all")
    users: list[UserSummary]


class SearchOut(BaseModel):
    query: str
    movies: list[Movie] = Field(description="titles containing the query, most rated first")


class VersionOut(BaseModel):
    model_name: str
    model_version: str
    run_id: str
    model_uri: str
    loaded_at: str


class HealthOut(BaseModel):
    status: str
    model_version: str
    cached_users: int


class ErrorOut(BaseModel):
    error: str


UserId = Annotated[int, Query(ge=0, le=MAX_ID, description="MovieLens userId")]
MovieId = Annotated[int, Query(ge=0, le=MAX_ID, description="MovieLens movieId")]
ERRORS = {404: {"model": ErrorOut}, 422: {"model": ErrorOut}}

api = FastAPI(title="NCF movie recommender",
              description="Recommendations and explanations from the champion NCF model (MovieLens ids).",
              responses={422: {"model": ErrorOut}})


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
    return JSONResponse({"error": "; ".join(problems)}, status_code=422)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@api.exception_handler(UnknownIdError)
async def _unknown(request: Request, exc: UnknownIdError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=404)


@api.exception_handler(Exception)
async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """A bug answers with a JSON error, never a traceback (the traceback goes to the replica's log)."""
    return JSONResponse({"error": f"internal error ({type(exc).__name__}) on {request.url.path}"}, status_code=500)


# ----------------------------------------------------------------------------- the deployment


@serve.deployment
@serve.ingress(api)
class Recommendations:
    """The ingress. Handlers that compute (explain, predict, history, search) are plain `def`, which
    FastAPI runs in its thread pool, so the event loop stays free for cached answers."""

    async def __init__(self, settings: dict, tracking_uri: str):
        self.config = ServeConfig.model_validate(settings)
        torch.set_num_threads(max(1, int(self.config.cpus_per_replica)))
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri, tracking_uri)
        self._ranked.set_max_batch_size(self.config.max_batch_size)
        self._ranked.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self.served = await asyncio.to_thread(load_served, resolve(self.config.model_uri, self.client),
                                              self.config.cache_users)
        self._follow_task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        """Warm the served version, then swap in each version the model URI moves to, once warmed."""
        await asyncio.to_thread(self.served.warm, self.config.warm_users)
        broken = None  # a version that failed to load is not retried until the URI moves again
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                version = await asyncio.to_thread(resolve, self.config.model_uri, self.client)
            except Exception as err:  # the store may be briefly unreachable: keep serving, ask again
                logger.warning("could not resolve %s: %s", self.config.model_uri, err)
                continue
            if str(version.version) in (self.served.version, broken):
                continue
            try:
                new = await asyncio.to_thread(load_served, version, self.config.cache_users)
                await asyncio.to_thread(new.warm, self.config.warm_users)
            except Exception:
                logger.exception("could not load %s version %s; still serving version %s",
                                 version.name, version.version, self.served.version)
                broken = str(version.version)
                continue
            self.served = new
            logger.info("now serving %s version %s", new.name, new.version)

    @serve.batch  # batch size and wait come from the config, set in __init__
    async def _ranked(self, requests: list[tuple[Served, int]]) -> list[Ranking]:
        """Rankings of users not cached yet: one catalogue pass per model version in the batch."""
        users: dict[Served, list[int]] = {}
        for served, user in requests:
            users.setdefault(served, []).append(user)
        ranked = {served: await asyncio.to_thread(served.rank, todo) for served, todo in users.items()}
        return [ranked[served][user] for served, user in requests]

    @api.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @api.get("/recommend", response_model=RecommendationsOut, responses=ERRORS)
    async def recommend(self, user_id: UserId, k: Annotated[int, Query(ge=1, le=MAX_K)] = 10) -> dict:
        """The k best movies the user has not rated; an unknown user gets the most rated movies (cold start)."""
        served = self.served
        user = served.user_index(user_id)
        cached = served.cold if user is None else served.cached(user)
        ranking = cached or await self._ranked((served, user))
        return {"user_id": user_id, "cold_start": user is None, "model_version": served.version,
                "items": served.items(ranking, k)}

    @api.get("/explain", response_model=ExplanationOut, responses=ERRORS)
    def explain(self, user_id: UserId, movie_id: MovieId) -> dict:
        """Why the model rates this movie so for this user: attention weights and the closest liked movies."""
        return self.served.explain(user_id, movie_id)

    @api.post("/predict", response_model=PredictionsOut, responses=ERRORS)
    def predict(self, body: PredictIn) -> dict:
        """Predicted rating, strength and attention weights of each (user, movie) pair; unknown ids are a 404."""
        served = self.served
        frame = served.recommender.predict_pairs([p.user_id for p in body.pairs], [p.movie_id for p in body.pairs])
        return {"model_version": served.version, "predictions": frame.to_dict(orient="records")}

    @api.get("/users", response_model=UsersOut)
    async def users(self, limit: Annotated[int, Query(ge=1, le=100_000)] = 1000) -> dict:
        """Known users by id, with their number of ratings (the page's user picker)."""
        served = self.served
        counts = np.diff(served.user_start)
        return {"count": len(counts), "users": [
            {"user_id": int(u), "n_ratings": int(n)}
            for u, n in zip(served.recommender.ids.user_ids[:limit], counts[:limit], strict=True)]}

    @api.get("/users/{user_id}/history", response_model=HistoryOut, responses=ERRORS)
    def history(self, user_id: Annotated[int, PathParam(ge=0, le=MAX_ID)]) -> dict:
        """Every rating the model knows of this user, most recent first."""
        served = self.served
        rated = served.ratings_of(int(served.recommender.user_indices([user_id])[0]))
        recent = np.argsort(-rated.timestamp, kind="stable")
        return {"user_id": user_id, "ratings": [
            served.movie(rated.movie[i]) | {"rating": float(rated.rating[i]), "timestamp": int(rated.timestamp[i])}
            for i in recent]}

    @api.get("/movies/search", response_model=SearchOut)
    def search(self, q: Annotated[str, Query(min_length=1, max_length=200, description="part of a title")],
               limit: Annotated[int, Query(ge=1, le=MAX_K)] = 20) -> dict:
        """Movies whose title contains `q` (any case), most rated first."""
        served = self.served
        query = q.strip().lower()
        if not query:
            raise HTTPException(422, "q: must not be blank")
        matches = served.lower_titles.str.contains(query, regex=False).to_numpy()
        found = served.by_popularity[matches[served.by_popularity]][:limit]
        return {"query": q, "movies": [served.movie(m) for m in found]}

    @api.get("/version", response_model=VersionOut)
    async def version(self) -> dict:
        """The model version answering now."""
        served = self.served
        return {"model_name": served.name, "model_version": served.version, "run_id": served.run_id,
                "model_uri": f"models:/{served.name}/{served.version}", "loaded_at": served.loaded_at}

    @api.get("/healthz", response_model=HealthOut)
    async def healthz(self) -> dict:
        return {"status": "ok", "model_version": self.served.version, "cached_users": len(self.served.rankings)}


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
    tracking_uri = args.pop("tracking_uri", None) or tracking.tracking_uri()
    return build(ServeConfig.model_validate(load_config().serve.model_dump() | args), tracking_uri)


@contextmanager
def running(config: ServeConfig, tracking_uri: str) -> Iterator[str]:
    """A local Ray instance serving the app on config.host:config.port; yields the base URL, then stops both."""
    # Ray's processes take the transport flag from the environment they start in; this process keeps its own.
    saved = os.environ.get(PROXY_GRPC)
    os.environ[PROXY_GRPC] = "1" if config.proxy_grpc else "0"
    try:
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    finally:
        if saved is None:
            os.environ.pop(PROXY_GRPC)
        else:
            os.environ[PROXY_GRPC] = saved
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build(config, tracking_uri), name=APP_NAME, route_prefix="/")
        yield f"http://{config.host}:{config.port}"
    finally:
        serve.shutdown()
        ray.shutdown()
