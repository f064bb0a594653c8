"""A user's ratings as served: the dataset's ratings the model version holds plus the live ones the ratings store
holds, merged into the one profile that ranking and explanations read; and the checks a posted rating must pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ncf.data import Ratings
from ncf.feedback_store import LiveRating, RatingEvent
from ncf.recommender import Recommender
from ncf.user_ratings import NEW_USER, Profiles


def live_movies(rec: Recommender, live: list[LiveRating]) -> np.ndarray:
    """The model version's index of each live rating's movie; -1 for a movie it does not know."""
    return rec.ids.movie_index(np.asarray([r.movie_id for r in live], dtype=np.int64))


def merged_profile(rec: Recommender, user_id: int, live: list[LiveRating]) -> Profiles:
    """The user's profile: their dataset ratings (none for a new user), then their live ones oldest first; a movie
    rated again counts with its latest rating. Live ratings of movies this version does not know are left out."""
    user = rec.user_index(user_id)
    stored = rec.ratings_of(user) if user is not None else Ratings.none()
    movies = live_movies(rec, live)
    known = movies >= 0
    movies = np.concatenate([stored.movie, movies[known]])
    ratings = np.concatenate([stored.rating, np.asarray([r.rating for r in live], dtype=np.float64)[known]])
    times = np.concatenate([stored.timestamp, np.asarray([r.timestamp for r in live], dtype=np.int64)[known]])
    _, first_from_end = np.unique(movies[::-1], return_index=True)
    latest = np.sort(len(movies) - 1 - first_from_end)  # each movie's last rating, in the order given
    return Profiles.one(movies[latest], ratings[latest], times[latest], NEW_USER if user is None else user)


@dataclass(frozen=True)
class RatingScale:
    """The ratings a model version's dataset allows: `low` to `high` in steps of `step` (MovieLens: 0.5 to 5.0 in
    half stars; older datasets: whole stars 1 to 5)."""

    low: float
    high: float
    step: float

    @classmethod
    def of(cls, rec: Recommender) -> RatingScale:
        """From the dataset's own ratings: their range, and the step their values are all multiples of."""
        values = np.unique(rec.history.rating)
        step = 0.5 if np.any(values % 1) else 1.0
        return cls(float(values.min()), float(values.max()), step)

    def rejects(self, rating: float) -> str | None:
        if not self.low <= rating <= self.high:
            return f"rating {rating} is off the scale {self.low} to {self.high}"
        if abs(rating / self.step - round(rating / self.step)) > 1e-9:
            return f"rating {rating} is not a multiple of {self.step}"
        return None


def rejections(events: list[RatingEvent], rec: Recommender, scale: RatingScale,
               registered: set[int]) -> list[str | None]:
    """Why each event cannot be stored (None: it can): a rating off the scale or its step, a movie the model
    version does not know, a user who is neither in the dataset nor given an id by POST /users."""
    known_movies = rec.ids.movie_index(np.asarray([e.movie_id for e in events], dtype=np.int64)) >= 0
    reasons = []
    for event, movie_known in zip(events, known_movies, strict=True):
        if rec.user_index(event.user_id) is None and event.user_id not in registered:
            reasons.append(f"unknown user {event.user_id}: not in the dataset and not created by POST /users")
        elif not movie_known:
            reasons.append(f"unknown movie {event.movie_id}")
        else:
            reasons.append(scale.rejects(event.rating))
    return reasons
