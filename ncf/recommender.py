"""A trained model plus everything needed to recommend with it, in raw MovieLens ids.

`Recommender` is what the registered MLflow model carries and what Ray Serve loads: the
item side (weights, the fitted candidate retriever, id maps, the movie table), the re-ranking
chosen on validation (`reranking.json`) and the ratings it was trained on, with the indexes
built from them once (ratings grouped by user, popularity, genres). Users' ratings are an input:
`rank_profiles` ranks any `Profiles` (retrieval then re-ranking, `ncf.ranking.rank_profiles`),
a known user's stored ratings or ratings the model never saw, and is the one ranking call of
evaluation, the pyfunc, Serve and batch jobs. It also answers pair predictions and explanations.

One thing, several faces: `ModelAlone` is the trained network without retriever or re-ranking (the metric
table's `ncf model alone` row, RMSE, pair predictions); `Recommender` is the whole ranking;
`ncf.integrations.mlflow_tracking.RecommenderPyfunc` is its MLflow pyfunc (the registered model);
`serving.deployment.RecommenderDeployment` is a Ray Serve replica serving it (deployment name `Recommendations`).
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from ncf import fold_in as folding
from ncf.config import Config, ModelConfig, RetrievalConfig
from ncf.config_migration import saved_section
from ncf.data import NO_GENRES, IdMaps, MovieLens, Ratings, genre_matrix
from ncf.model import NCF, UserSide, forward_batched
from ncf.ranking import CandidateRetriever, Reranking, blended_pairs, candidate_retriever, rank_profiles
from ncf.retrievers import FILE_NAME, load_retriever
from ncf.retrievers.base import strongest_first
from ncf.user_ratings import NEW_USER, Profiles, SeenItems

WEIGHTS, CONFIG, IDS, MOVIES, HISTORY = "weights.pt", "config.yaml", "ids.json", "movies.csv", "history.npz"
RERANKING = "reranking.json"  # the re-ranking chosen on validation (folders saved before it: the config's)
PAIR_COLUMNS = ["user_id", "movie_id", "predicted_rating", "strength", "user_weight", "movie_weight"]
TOP_K_COLUMNS = ["user_id", "rank", "movie_id", "title", "predicted_rating", "strength", "user_weight",
                 "movie_weight"]


class UnknownIdError(ValueError):
    """Ids the model has never seen; the message lists them."""


class ModelAlone:
    """The trained network alone, without retriever or re-ranking: batched, gradient-free pair predictions and
    explanations, and catalogue scores, in the `Scorable` shape. It is the metric table's `ncf model alone` row
    and its RMSE, and what `Recommender` predicts and explains pairs with."""

    def __init__(self, model: NCF):
        self.model = model.eval()

    def explain(self, users: np.ndarray, movies: np.ndarray,
                user_side: UserSide | None = None) -> dict[str, np.ndarray]:
        """Predicted rating, strength and the two attention weights of each pair; with `user_side`, `users` are
        its rows (folded-in users, `ncf.fold_in`)."""
        out = forward_batched(self.model, np.asarray(users), np.asarray(movies), user_side=user_side)
        return {name: value.numpy() for name, value in out._asdict().items()}

    def predict(self, users: np.ndarray, movies: np.ndarray) -> np.ndarray:
        return self.explain(users, movies)["rating"]

    def score(self, users: np.ndarray) -> torch.Tensor:
        return self.model.score_users(torch.as_tensor(np.asarray(users)))

    def score_pairs(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """The ranking logit of given candidates ([U, C]): the sampled protocol without a catalogue pass."""
        return blended_pairs(self.model, None, Reranking(0), users, candidates)


def saved_retrieval(config: dict) -> RetrievalConfig | None:
    """The retrieval section of a saved training config (keys added since filled in), None if it has none."""
    return RetrievalConfig.model_validate(saved_section("retrieval", config["retrieval"])) if "retrieval" in config \
        else None


def saved_reranking(folder: Path, config: dict) -> Reranking:
    """The re-ranking saved beside the model; a folder saved before it existed kept it in its config's retrieval
    section (none without a retrieval section)."""
    if (folder / RERANKING).exists():
        return Reranking(**json.loads((folder / RERANKING).read_text()))
    retrieval = saved_retrieval(config)
    return Reranking.from_config(retrieval) if retrieval else Reranking(0)


class Recommender:
    score = None  # as an evaluation `Scorable`, it ranks with `rank`, not by a catalogue score

    def __init__(self, model: NCF, config: dict, ids: IdMaps, movies: pd.DataFrame, history: Ratings,
                 reranking: Reranking, candidates: CandidateRetriever | None = None):
        self.model = model.eval()
        self.config = config  # the resolved training config, kept as the run's record
        self.ids = ids
        self.movies = movies.reset_index(drop=True)
        self.history = history  # every known rating (train + validation), encoded
        self.model_alone = ModelAlone(self.model)  # pair predictions and explanations
        self.predict = self.model_alone.predict
        self.candidates = candidates  # fitted on `history`
        self.reranking = reranking
        # The catalogue's half of every scoring pass, for ranking the whole catalogue (no retriever).
        self.movie_side = self.model.movie_side() if self.candidates is None else None
        # Every known user's profile (row u: user u); the retrieval stage, built from `history` too, holds them already.
        self.known = candidates.known if candidates is not None else Profiles.of_ratings(history, ids.n_users)
        self.seen = self.known.seen()
        self.popularity = np.bincount(history.movie, minlength=ids.n_movies)
        # Without a retriever, how a user the model has no embedding for is ranked.
        self.popularity_scores = np.log1p(self.popularity.astype(np.float32))
        self.by_popularity = np.argsort(-self.popularity, kind="stable")
        self.movie_means = (np.bincount(history.movie, weights=history.rating, minlength=ids.n_movies)
                            / np.maximum(self.popularity, 1))
        self.titles = self.movies["title"].tolist()
        self.lower_titles = self.movies["title"].str.lower()
        self.genre_lists = [[] if g == NO_GENRES else g.split("|") for g in self.movies["genres"]]

    @classmethod
    def from_training(cls, model: NCF, config: Config, data: MovieLens, retriever: CandidateRetriever | None = None,
                      reranking: Reranking | None = None) -> Recommender:
        """`retriever` fitted on train + validation, like `model`; `reranking` the one chosen on validation
        (default: `config.retrieval`'s)."""
        return cls(model, config.model_dump(mode="json"), data.ids, data.movies, data.splits.train_and_validation(),
                   reranking or Reranking.from_config(config.retrieval), retriever)

    # ------------------------------------------------------------------ persistence

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), folder / WEIGHTS)
        (folder / CONFIG).write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.ids.save(folder / IDS)
        self.movies.to_csv(folder / MOVIES, index=False)
        h = self.history
        np.savez_compressed(folder / HISTORY, user=h.user, movie=h.movie, rating=h.rating, timestamp=h.timestamp)
        (folder / RERANKING).write_text(json.dumps(dataclasses.asdict(self.reranking), indent=1))
        if self.candidates is not None:
            self.candidates.retriever.save(folder)
        return folder

    @classmethod
    def load(cls, folder: Path) -> Recommender:
        folder = Path(folder)
        config = yaml.safe_load((folder / CONFIG).read_text())
        # Only the model section shapes the network: sections added since training do not matter here.
        model_config = ModelConfig.model_validate(saved_section("model", config["model"]))
        ids = IdMaps.load(folder / IDS)
        movies = pd.read_csv(folder / MOVIES, dtype={"title": str, "genres": str}, keep_default_na=False)
        with np.load(folder / HISTORY) as arrays:
            history = Ratings(arrays["user"], arrays["movie"], arrays["rating"], arrays["timestamp"])
        genres = torch.from_numpy(genre_matrix(movies)[0]) if model_config.use_genres else None
        model = NCF(ids.n_users, ids.n_movies, model_config, genres)
        model.load_state_dict(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True))
        candidates = None
        if (folder / FILE_NAME).exists():  # the saved retriever, with what its config adds from the same ratings
            candidates = candidate_retriever(load_retriever(folder), saved_retrieval(config), history, ids.n_users,
                                             ids.n_movies)
        return cls(model, config, ids, movies, history, saved_reranking(folder, config), candidates)

    # ------------------------------------------------------------------ id handling

    def user_indices(self, user_ids) -> np.ndarray:
        index = self.ids.user_index(np.asarray(user_ids, dtype=np.int64))
        if (index < 0).any():
            raise UnknownIdError(f"unknown user id(s): {sorted(set(np.asarray(user_ids)[index < 0].tolist()))[:20]}")
        return index

    def movie_indices(self, movie_ids) -> np.ndarray:
        index = self.ids.movie_index(np.asarray(movie_ids, dtype=np.int64))
        if (index < 0).any():
            raise UnknownIdError(f"unknown movie id(s): {sorted(set(np.asarray(movie_ids)[index < 0].tolist()))[:20]}")
        return index

    def user_index(self, user_id: int) -> int | None:
        """The index of a raw user id; None for a user the model has never seen."""
        return self.ids.user_position(user_id)

    def ratings_of(self, user: int) -> Ratings:
        """The known ratings of one user (by index)."""
        return self.known.of(user)

    def ratings_per_user(self) -> np.ndarray:
        return self.known.counts()

    def profiles_of(self, users: np.ndarray) -> Profiles:
        """Known users' (by index) profiles: their stored ratings, gathered without a loop over users."""
        return self.known.take(np.asarray(users, dtype=np.int64))

    def profile(self, movie_ids, ratings, timestamps=None, user_id: int | None = None) -> Profiles:
        """One user's profile from raw movie ids and their ratings (`Profiles.one`); unknown movie ids raise
        UnknownIdError. With the raw id of a user the model knows, its ranking is re-ranked with the user's
        embedding (or its folded-in side); any other user (a new one) is ranked by the retrieval stage alone, or
        re-ranked from its folded-in side (`rank_profiles(..., fold_in=True)`)."""
        user = self.user_index(user_id) if user_id is not None else None
        return Profiles.one(self.movie_indices(np.asarray(movie_ids, dtype=np.int64).reshape(-1)), ratings,
                            timestamps, NEW_USER if user is None else user)

    # ------------------------------------------------------------------ answers

    def predict_pairs(self, user_ids, movie_ids) -> pd.DataFrame:
        """One row per pair; unknown user or movie ids raise UnknownIdError (no silent fallback)."""
        users, movies = self.user_indices(user_ids), self.movie_indices(movie_ids)
        out = self.model_alone.explain(users, movies)
        return pd.DataFrame({
            "user_id": np.asarray(user_ids, dtype=np.int64), "movie_id": np.asarray(movie_ids, dtype=np.int64),
            "predicted_rating": out["rating"], "strength": out["strength"],
            "user_weight": out["user_weight"], "movie_weight": out["movie_weight"],
        }, columns=PAIR_COLUMNS)

    def fold_in(self, profiles: Profiles) -> UserSide:
        """Each profile's user side folded in from its ratings (`ncf.fold_in`): its user's embedding moved towards
        the profile's ratings, a new user's started from the mean user. Fold once per profile change and pass the
        side to `rank_profiles` and `explain_profile`."""
        return folding.fold_in(self.model, profiles)

    def rank_profiles(self, profiles: Profiles, k: int, fold_in: bool = False,
                      user_side: UserSide | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The one ranking call: movie indices of each profile's k best movies outside its own (profiles x k) and
        their scores, best first (-inf past the end of what a profile leaves to offer). Retrieval from the
        profile's ratings, re-ranked by the NCF where the profile's user has an embedding; a user without one (a
        new user) gets the retrieval stage's order; a profile with nothing to score, the most rated movies
        (`ncf.ranking.rank_profiles`). With `user_side` (a row per profile) or `fold_in` (this call folds them in:
        `fold_in`), every profile is re-ranked by the NCF from its folded-in user side, new users' included."""
        if fold_in and user_side is None:
            user_side = self.fold_in(profiles)
        return rank_profiles(self.model, self.candidates, self.reranking, profiles, k, self.movie_side,
                             self.popularity_scores, user_side=user_side)

    def explain_profile(self, profile: Profiles, movies: np.ndarray,
                        user_side: UserSide | None = None) -> dict[str, np.ndarray]:
        """What the model says of `movies` for the profile's (first row's) user, as `ModelAlone.explain`: from its
        folded-in `user_side` (first row) when given, else its user's embedding (a new user has none: ValueError)."""
        movies = np.asarray(movies, dtype=np.int64)
        if user_side is not None:
            return self.model_alone.explain(np.zeros(len(movies), dtype=np.int64), movies, user_side.take([0]))
        if not profile.known()[0]:
            raise ValueError("a new user's profile has no embedding: explain it with its folded-in user side")
        return self.model_alone.explain(np.full(len(movies), profile.users[0]), movies)

    def top_k(self, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`rank_profiles` of known users (by index), each with their stored ratings."""
        return self.rank_profiles(self.profiles_of(users), k)

    def rank(self, users: np.ndarray, seen: SeenItems, k: int) -> np.ndarray:
        """The evaluation's ranker: each user's stored ratings ranked as served, so `seen` (what is left out) must
        be their movies: the ratings the model was trained on."""
        if not np.array_equal(seen.counts(), self.known.counts()):
            raise ValueError("the recommender leaves out each user's stored movies: `seen` must be its history's")
        return self.top_k(users, k)[0]

    def score_pairs(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Given candidates ([U, C]) scored as the served ranking orders them (the sampled protocol)."""
        return blended_pairs(self.model, self.candidates, self.reranking, users, candidates)

    def recommend(self, user_ids, k: int = 10) -> pd.DataFrame:
        """Top-k movies each user has not rated, best first (`rank_profiles` of their stored ratings), with what the
        model says of each pair: the pyfunc's answer. Unknown users raise UnknownIdError."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        known = self.user_indices(user_ids)
        top, _ = self.top_k(known, k)
        n = top.shape[1]
        users = np.repeat(known, n)
        out = self.model_alone.explain(users, top.ravel())
        return pd.DataFrame({
            "user_id": np.repeat(user_ids, n), "rank": np.tile(np.arange(1, n + 1), len(user_ids)),
            "movie_id": self.ids.movie_ids[top.ravel()], "title": self.movies["title"].to_numpy()[top.ravel()],
            "predicted_rating": out["rating"], "strength": out["strength"],
            "user_weight": out["user_weight"], "movie_weight": out["movie_weight"],
        }, columns=TOP_K_COLUMNS)

    def popular(self, k: int) -> np.ndarray:
        """Movie indices by number of known ratings: the cold-start answer."""
        return self.by_popularity[:k]

    def onboarding(self, k: int, rated: np.ndarray) -> np.ndarray:
        """k movie indices to ask a new user to rate, none of `rated`: each genre's most rated movie not picked yet,
        genre after genre (the most rated genres first), round after round, so that a few ratings already tell
        tastes apart."""
        taken = set(np.asarray(rated, dtype=np.int64).tolist())  # rated, or picked already
        picked: list[int] = []
        positions = dict.fromkeys(self.genre_queues, 0)
        while len(picked) < k and positions:
            for genre in list(positions):
                queue, at = self.genre_queues[genre], positions[genre]
                while at < len(queue) and queue[at] in taken:
                    at += 1
                if at == len(queue):
                    del positions[genre]
                    continue
                positions[genre] = at + 1
                picked.append(queue[at])
                taken.add(queue[at])
                if len(picked) == k:
                    break
        return np.asarray(picked, dtype=np.int64)

    @cached_property
    def genre_queues(self) -> dict[str, list[int]]:
        """Each genre's movies, most rated first; genres by their number of ratings, most first."""
        queues: dict[str, list[int]] = {}
        for movie in self.by_popularity.tolist():
            for genre in self.genre_lists[movie] or [NO_GENRES]:
                queues.setdefault(genre, []).append(movie)
        ratings = {g: int(self.popularity[movies].sum()) for g, movies in queues.items()}
        return {g: queues[g] for g in sorted(queues, key=lambda g: (-ratings[g], g))}

    def search_titles(self, query: str, limit: int) -> np.ndarray:
        """Indices of movies whose title contains `query` (any case), most rated first."""
        matches = self.lower_titles.str.contains(query.lower(), regex=False).to_numpy()
        return self.by_popularity[matches[self.by_popularity]][:limit]

    def retrieval_evidence(self, profile: Profiles, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """The profile's movies (its first row) that made the retriever propose `movie`, strongest first, with
        their shares."""
        if self.candidates is None:
            return np.empty(0, np.int64), np.empty(0)
        return self.candidates.evidence(profile, movie)

    def sequence_evidence(self, profile: Profiles, movie: int) -> tuple[np.ndarray, np.ndarray]:
        """The profile's recent movies (its first row) that `movie` often follows in others' histories (the
        sequence signal), strongest first, with their terms of its score; none without a sequence signal."""
        if self.candidates is None:
            return np.empty(0, np.int64), np.empty(0)
        return self.candidates.sequence_evidence(profile, movie)

    def history_evidence(self, profile: Profiles, movie: int,
                         user_side: UserSide | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The profile's rated movies (its first row) the history model's attention leaned on for `movie`,
        strongest first: each rating's term of the pooled history's effect on the movie's ranking logit,
        linearised at the user's side (`user_side`'s first row, else the known user's own); none for a model
        whose user side reads no history."""
        if not self.model.reads_history:
            return np.empty(0, np.int64), np.empty(0)
        side = user_side.take([0]) if user_side is not None else self.model.user_side(
            torch.as_tensor(profile.users[:1]))
        vector = side.embedding.detach().clone().requires_grad_()
        movies = torch.as_tensor([movie])
        logit = self.model.pair_logits(UserSide(vector, side.bias), torch.zeros(1, dtype=torch.int64), movies,
                                       self.model.movie_side(movies), self.model.ranking_head)
        (direction,) = torch.autograd.grad(logit.sum(), vector)
        return strongest_first(*self.model.history.shares(profile.of(0), direction[0]), movie)

    @torch.no_grad()
    def movie_similarity(self, movie: int, others: np.ndarray) -> np.ndarray:
        """Cosine similarity of the movie-side representations."""
        vectors = self.model.movie_vectors(torch.as_tensor(np.concatenate([[movie], others])))
        vectors = torch.nn.functional.normalize(vectors, dim=1)
        return (vectors[1:] @ vectors[0]).numpy()
