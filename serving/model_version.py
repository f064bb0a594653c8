"""The model version being served: which registered version a model URI points at, loading it,
and what is computed from it once per version (scoring's movie side, cached rankings)."""

from __future__ import annotations

import re
import tempfile
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic_core import to_json

from ncf.config import MODEL_URI
from ncf.config_migration import saved_section
from ncf.data import Ratings
from ncf.feedback_store import LiveRating
from ncf.model import UserSide
from ncf.recommender import Recommender
from ncf.user_ratings import Profiles
from serving.live_ratings import RatingScale, live_movies, merged_profile
from serving.schemas import MAX_K, Item, Movie, RecommendationsOut

BECAUSE_N = 5
# What /recommend writes, piece by piece, exactly as the schemas' own serialiser would: `Item` writes its figures
# (below: each with the `Ranking` field it comes from), then the movie's fields. The figures are formatted per
# request, each movie's fields once per version.
FIGURES = {"predicted_rating": "rating", "strength": "strength", "user_weight": "user_weight",
           "movie_weight": "movie_weight"}
if tuple(Item.model_fields) != (*FIGURES, *Movie.model_fields) or tuple(RecommendationsOut.model_fields) != (
        "user_id", "cold_start", "model_version", "variant", "rec_id", "items"):
    raise RuntimeError("serving.schemas changed the order of /recommend's fields: update serving.model_version")
ITEM_JSON = b"{" + b"".join(b'"%s":%%b,' % name.encode() for name in FIGURES) + b"%b"
RECOMMENDATIONS_JSON = b'{"user_id":%d,"cold_start":%b,"model_version":%b,"variant":"%s","rec_id":%b,"items":[%b]}'


class ModelNotFoundError(LookupError):
    """The model URI points at no registered version."""


def resolve_version(model_uri: str, client: MlflowClient) -> ModelVersion:
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


@dataclass(frozen=True)
class Ranking:
    """Movies best first, with what the model says of each (user, movie) pair."""

    movies: np.ndarray
    rating: np.ndarray
    strength: np.ndarray
    user_weight: np.ndarray
    movie_weight: np.ndarray


@dataclass(frozen=True)
class LiveUser:
    """A user with live ratings, as of the latest one (`stamp`, its sequence number in the store)."""

    stamp: int
    profile: Profiles
    side: UserSide
    ranking: Ranking
    live_movies: frozenset[int]  # movie indices whose rating in the profile is a live one


def ranking_of(movies: np.ndarray, scores: np.ndarray, figures: dict[str, np.ndarray]) -> Ranking:
    """One ranked row (fewer than MAX_K unseen movies leave -inf at its end) with the model's figures of its pairs."""
    kept = np.isfinite(scores)
    return Ranking(movies[kept], *(figures[field][kept] for field in FIGURES.values()))


def bound(cache: OrderedDict, size: int) -> None:
    """Drop the least recently asked for entries beyond `size`."""
    while len(cache) > size:
        with suppress(KeyError):  # another thread may have just evicted it
            cache.popitem(last=False)


class ServedVersion:
    """One registered model version and its per-version state: the movie side of scoring (computed
    once), the cold-start answer, and `rankings`, which fills as users are asked for (or warmed),
    keeps the `cache_users` most recently asked for, and dies with the version, so a new model
    never answers from its predecessor's cache. Ratings by user, popularity and genres are the
    recommender's own indexes.
    """

    def __init__(self, recommender: Recommender, version: ModelVersion, cache_users: int):
        self.recommender = recommender
        self.cache_users = cache_users
        self.name, self.version, self.run_id = version.name, str(version.version), version.run_id
        self.loaded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        # "Because you rated" draws from ratings this high (or the user's best, if lower): the version's own
        # `evaluation.relevant_rating`, the rating its evaluation counted as liked.
        self.liked_rating = saved_section("evaluation", recommender.config.get("evaluation") or {})["relevant_rating"]
        self.scale = RatingScale.of(recommender)  # the ratings POST /ratings accepts
        popular = recommender.popular(MAX_K)
        means = recommender.movie_means[popular]
        lo, hi = recommender.model.cfg.rating_min, recommender.model.cfg.rating_max
        # Cold start: the most rated movies, each at its mean rating; only the movie side speaks.
        self.cold = Ranking(popular, means, (means - lo) / (hi - lo), np.zeros(len(popular)), np.ones(len(popular)))
        self.rankings: OrderedDict[int, Ranking] = OrderedDict()  # least recently asked for first
        self.live_users: OrderedDict[int, LiveUser] = OrderedDict()  # by raw user id, least recently asked for first
        self.movie_json: dict[int, bytes] = {}  # movie index -> its fields in an item's JSON, filled as asked for

    def cached(self, user: int) -> Ranking | None:
        ranking = self.rankings.get(user)
        if ranking is not None:
            with suppress(KeyError):  # another thread may have just evicted it
                self.rankings.move_to_end(user)
        return ranking

    def rank(self, users: list[int]) -> dict[int, Ranking]:
        """The top-`MAX_K` unseen movies of each user, by index, from their dataset ratings: cached ones as they
        are, the others in one pass, then cached (the least recently asked for make room beyond `cache_users`)."""
        found = {u: r for u in set(users) if (r := self.cached(u)) is not None}
        todo = np.asarray(sorted(set(users) - found.keys()), dtype=np.int64)
        if len(todo) == 0:
            return found
        rec = self.recommender
        movies, scores = rec.rank_profiles(rec.profiles_of(todo), MAX_K)  # their stored ratings as profiles
        k = movies.shape[1]
        pairs = rec.model_alone.explain(np.repeat(todo, k), movies.ravel())
        for row, user in enumerate(todo):
            part = slice(row * k, (row + 1) * k)
            found[int(user)] = self.rankings[int(user)] = ranking_of(movies[row], scores[row],
                                                                     {f: v[part] for f, v in pairs.items()})
        bound(self.rankings, self.cache_users)
        return found

    def cached_live(self, user_id: int, stamp: int) -> LiveUser | None:
        """The cached state of a user with live ratings, if computed as of their latest one (`stamp`)."""
        entry = self.live_users.get(user_id)
        if entry is None or entry.stamp != stamp:
            return None
        with suppress(KeyError):  # another thread may have just evicted it
            self.live_users.move_to_end(user_id)
        return entry

    def live_user(self, user_id: int, live: list[LiveRating]) -> LiveUser:
        """The user as their live ratings leave them (`live`, oldest first, not empty): their merged profile, its
        fold-in and their top-`MAX_K`; computed once per latest live rating, kept like `rankings`."""
        entry = self.cached_live(user_id, live[-1].seq)
        if entry is not None:
            return entry
        rec = self.recommender
        profile = merged_profile(rec, user_id, live)
        side = rec.fold_in(profile)
        movies, scores = rec.rank_profiles(profile, MAX_K, user_side=side)
        figures = rec.explain_profile(profile, movies[0], side)
        entry = self.live_users[user_id] = LiveUser(live[-1].seq, profile, side,
                                                    ranking_of(movies[0], scores[0], figures),
                                                    frozenset(live_movies(rec, live).tolist()))
        bound(self.live_users, self.cache_users)
        return entry

    def warm(self, n_users: int, chunk: int = 8) -> None:
        """Rank the `n_users` most active users ahead of their requests."""
        most_active = np.argsort(-self.recommender.ratings_per_user(), kind="stable")[:n_users]
        for start in range(0, len(most_active), chunk):
            self.rank(most_active[start: start + chunk].tolist())

    def movie(self, index: int) -> dict:
        rec = self.recommender
        return {"movie_id": int(rec.ids.movie_ids[index]), "title": rec.titles[index], "genres": rec.genre_lists[index]}

    def rec_id(self, user_id: int, stamp: int, k: int) -> str:
        """Names a /recommend answer: this version's, for the user with their ratings as of live rating `stamp`
        (0: none), k long. The same answer always gets the same id, so a replayed answer stays true."""
        return f"{self.version}.{user_id}.{stamp}.{k}"

    def recommendations_json(self, user_id: int, ranking: Ranking, k: int, cold_start: bool, stamp: int = 0,
                             variant: str = "champion") -> bytes:
        """The /recommend body (`RecommendationsOut`) of the first k movies of `ranking`, byte for byte what the
        schema's serialiser writes, without building or validating a model per request. `stamp`: the user's
        latest live rating the ranking was computed with (0: none); `variant`: the experiment's side this version
        answers for (champion or challenger, plain names that need no escaping)."""
        movies = ranking.movies[:k].tolist()
        # One call formats every figure: a flat JSON array of numbers, split at its commas.
        figures = to_json(np.column_stack([getattr(ranking, field)[:k] for field in FIGURES.values()])
                          .ravel().tolist())[1:-1].split(b",")
        n = len(FIGURES)
        items = b",".join(ITEM_JSON % (*figures[i * n: (i + 1) * n], self._movie_json(m)) for i, m in enumerate(movies))
        return RECOMMENDATIONS_JSON % (user_id, b"true" if cold_start else b"false", to_json(self.version),
                                       variant.encode(), to_json(self.rec_id(user_id, stamp, k)), items)

    def _movie_json(self, index: int) -> bytes:
        """The movie's fields as an `Item` writes them, after the figures: serialised once per version."""
        piece = self.movie_json.get(index)
        if piece is None:
            piece = self.movie_json[index] = Movie.model_validate(self.movie(index)).model_dump_json().encode()[1:]
        return piece

    def explain(self, user_id: int, movie_id: int, live: list[LiveRating]) -> dict:
        """The pair's prediction and attention weights, the user's liked movies closest to it in the model,
        and the rated movies of the user's profile (their dataset ratings, then `live`, their live ones) that made
        the retriever propose it."""
        rec = self.recommender
        movie = int(rec.movie_indices([movie_id])[0])
        if live:
            user = self.live_user(user_id, live)
            profile, live_movies, side = user.profile, user.live_movies, user.side
            out = rec.explain_profile(profile, np.asarray([movie]), side)
        else:
            index = int(rec.user_indices([user_id])[0])
            profile, live_movies, side = rec.profiles_of([index]), frozenset(), None
            out = rec.model_alone.explain(np.asarray([index]), np.asarray([movie]))
        rated = profile.of(0)
        source = {m: "live" if m in live_movies else "dataset" for m in rated.movie.tolist()}
        liked = rated.take(np.flatnonzero((rated.rating >= min(self.liked_rating, rated.rating.max()))
                                          & (rated.movie != movie)))
        similarity = rec.movie_similarity(movie, liked.movie) if len(liked) else np.empty(0)
        closest = np.argsort(-similarity, kind="stable")[:BECAUSE_N]
        genre_counts: dict[str, int] = {}
        for m in liked.movie:
            for genre in rec.genre_lists[m]:
                genre_counts[genre] = genre_counts.get(genre, 0) + 1
        shared = sorted((g for g in rec.genre_lists[movie] if g in genre_counts), key=lambda g: (-genre_counts[g], g))
        return {
            "user_id": user_id, **self.movie(movie), "model_version": self.version,
            "predicted_rating": float(out["rating"][0]), "strength": float(out["strength"][0]),
            "user_weight": float(out["user_weight"][0]), "movie_weight": float(out["movie_weight"][0]),
            "because_you_rated": [self.movie(liked.movie[i]) | {"rating": float(liked.rating[i]),
                                                                "source": source[int(liked.movie[i])],
                                                                "similarity": float(similarity[i])} for i in closest],
            "shared_genres": shared,
            "retriever": rec.candidates.name if rec.candidates is not None else None,
            "retrieved_because_you_rated": self.evidence(rated, source, *rec.retrieval_evidence(profile, movie)),
            "rated_next_after": self.evidence(rated, source, *rec.sequence_evidence(profile, movie)),
            "history_attention": self.evidence(rated, source, *rec.history_evidence(profile, movie, side)),
        }

    def evidence(self, rated: Ratings, source: dict[int, str], movies: np.ndarray, shares: np.ndarray) -> list[dict]:
        """The first BECAUSE_N of the profile's `rated` movies behind a score, each with its rating, its `source`
        and its share."""
        movies, shares = movies[:BECAUSE_N], shares[:BECAUSE_N]
        rating_of = dict(zip(rated.movie.tolist(), rated.rating.tolist(), strict=True))
        return [self.movie(m) | {"rating": float(rating_of[int(m)]), "source": source[int(m)], "weight": float(w)}
                for m, w in zip(movies, shares, strict=True)]


def load_version(version: ModelVersion, cache_users: int) -> ServedVersion:
    """Download and load one registered version; its files are read into memory, then deleted."""
    with tempfile.TemporaryDirectory(prefix="ncf-serve-") as tmp:
        model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}", dst_path=tmp)
        return ServedVersion(model.unwrap_python_model().recommender, version, cache_users)
