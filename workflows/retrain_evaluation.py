"""What `make retrain` compares: champion and challenger on the fresh hold-out (the live ratings after the cut),
and the offline gate.

Each model ranks the hold-out's users as it would serve them at the cut (`served_ranker`): a user with live
ratings up to the cut gets the merged profile (dataset ratings + live ones, `serving.live_ratings.merged_profile`)
folded in, as Serve answers them; any other user their stored ratings (a new user without any: the most rated
movies). The champion is reported frozen (its dataset ratings only: no live ratings) and as served (what users get
today); the challenger as it would be served. Targets are the hold-out's latest rating of each pair the user had
not rated before the cut; full-ranking metrics at k=10 (`ncf.evaluation.full_ranking_against`) over the users with
a relevant one, and paired bootstrap intervals of the NDCG@10 differences over those users.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ncf.data import Ratings
from ncf.evaluation import Ranker, full_ranking_against
from ncf.feedback_store import LiveRating
from ncf.live_training import latest_per_pair, pair_keys
from ncf.metrics import BootstrapInterval, paired_bootstrap
from ncf.recommender import Recommender
from ncf.user_ratings import Profiles, SeenItems
from serving.live_ratings import merged_profile

FIGURES = ("full_ndcg_at_10", "full_hit_rate_at_10", "full_recall_at_10")
CHAMPION_FROZEN, CHAMPION_SERVED, CHALLENGER = "champion_frozen", "champion_served", "challenger"


def by_user(live: Sequence[LiveRating]) -> dict[int, list[LiveRating]]:
    """Each user's live ratings, oldest (by seq) first."""
    grouped: dict[int, list[LiveRating]] = {}
    for r in sorted(live, key=lambda r: r.seq):
        grouped.setdefault(r.user_id, []).append(r)
    return grouped


def served_ranker(rec: Recommender, user_ids: np.ndarray, live: dict[int, list[LiveRating]]) -> Ranker:
    """A ranker of rows of `user_ids` (raw ids) as `rec` serves them with the live ratings `live` (module docstring);
    the ranking leaves out each profile's own movies, so the `seen` it is given is not read."""
    def rank(rows: np.ndarray, _seen: SeenItems, k: int) -> np.ndarray:
        top = np.empty((len(rows), k), dtype=np.int64)
        stored = []  # rows ranked from the stored ratings of a known user: one call for all of them
        for i, row in enumerate(rows):
            user_id = int(user_ids[row])
            index = rec.user_index(user_id)
            if user_id in live:
                top[i] = rec.rank_profiles(merged_profile(rec, user_id, live[user_id]), k, fold_in=True)[0][0]
            elif index is not None:
                stored.append((i, index))
            else:
                top[i] = rec.rank_profiles(Profiles.one([], []), k)[0][0]
        if stored:
            at, users = (np.asarray(column) for column in zip(*stored, strict=True))
            top[at] = rec.rank_profiles(rec.profiles_of(users), k)[0]
        return top

    return rank


@dataclass(frozen=True)
class Holdout:
    """The hold-out's targets: row i of `target` (by `target.user`) is user `user_ids[i]`; movies are indices."""

    user_ids: np.ndarray
    target: Ratings

    @classmethod
    def of(cls, holdout: Sequence[LiveRating], challenger: Recommender) -> Holdout:
        """The latest rating of each hold-out pair whose movie the models know and which the user had not rated
        before the cut (not in the challenger's history: dataset ratings and live ones up to the cut)."""
        fresh = latest_per_pair(holdout)
        users = np.asarray([r.user_id for r in fresh], dtype=np.int64)
        movies = challenger.ids.movie_index(np.asarray([r.movie_id for r in fresh], dtype=np.int64))
        history = challenger.history
        rated_before = np.isin(pair_keys(challenger.ids.user_index(users), movies),
                               pair_keys(history.user, history.movie))
        kept = (movies >= 0) & ~rated_before
        user_ids, rows = np.unique(users[kept], return_inverse=True)
        return cls(user_ids, Ratings(rows.astype(np.int64), movies[kept],
                                     np.asarray([r.rating for r in fresh], dtype=np.float64)[kept],
                                     np.asarray([r.timestamp for r in fresh], dtype=np.int64)[kept]))

    def evaluate(self, rank: Ranker, n_movies: int, evaluation) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Full-ranking figures and per-user arrays (users with a relevant target, sorted: the same for any model)."""
        nobody = SeenItems(np.zeros(0, np.int64), np.zeros(0, np.int64), len(self.user_ids))
        return full_ranking_against(rank, nobody, self.target, n_movies, evaluation=evaluation)


@dataclass(frozen=True)
class HoldoutComparison:
    figures: dict[str, dict[str, float]]  # model (CHAMPION_FROZEN, CHAMPION_SERVED, CHALLENGER) -> figure -> value
    minus_served: BootstrapInterval | None  # challenger's NDCG@10 minus the champion's as served; None: no users
    minus_frozen: BootstrapInterval | None
    users: int  # hold-out users with a relevant target


def compare_on_holdout(champion: Recommender, challenger: Recommender, training: Sequence[LiveRating],
                       holdout: Sequence[LiveRating], evaluation, n_resamples: int) -> HoldoutComparison:
    """Champion frozen, champion as served and challenger on the fresh hold-out, with paired intervals."""
    if not np.array_equal(champion.ids.movie_ids, challenger.ids.movie_ids):
        raise ValueError("champion and challenger know different movies: not the same dataset")
    fresh = Holdout.of(holdout, challenger)
    live = by_user(training)
    rankers = {CHAMPION_FROZEN: served_ranker(champion, fresh.user_ids, {}),
               CHAMPION_SERVED: served_ranker(champion, fresh.user_ids, live),
               CHALLENGER: served_ranker(challenger, fresh.user_ids, live)}
    if not (fresh.target.rating >= evaluation.relevant_rating).any():
        return HoldoutComparison({}, None, None, 0)
    figures, per_user = {}, {}
    for name, rank in rankers.items():
        summary, per_user[name] = fresh.evaluate(rank, challenger.ids.n_movies, evaluation)
        figures[name] = {f: summary[f] for f in FIGURES}
    ndcg = {name: arrays["full_ndcg_at_10"] for name, arrays in per_user.items()}
    return HoldoutComparison(figures, paired_bootstrap(ndcg[CHALLENGER], ndcg[CHAMPION_SERVED], n_resamples),
                             paired_bootstrap(ndcg[CHALLENGER], ndcg[CHAMPION_FROZEN], n_resamples),
                             len(ndcg[CHALLENGER]))


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: tuple[str, ...]  # why it failed (empty when it passed)

    @property
    def tag(self) -> str:
        return "passed" if self.passed else "failed"


def offline_gate(metric: str, challenger_value: float, champion_value: float | None, lower_is_better: bool,
                 tolerance: float | None, holdout: HoldoutComparison) -> GateResult:
    """Pass when the challenger's hold-out NDCG@10 minus the champion's as served is not significantly negative
    (the 95% interval's high end >= 0) AND, with a `tolerance`, its validation `metric` is at most `tolerance` worse
    than the champion's (a champion without the figure then fails it). A hold-out without a user to rank fails it."""
    reasons = []
    if tolerance is not None and champion_value is None:
        reasons.append(f"the champion has no validation {metric} to compare with")
    elif tolerance is not None:
        worse_by = (challenger_value - champion_value) * (1 if lower_is_better else -1)
        if worse_by > tolerance:
            reasons.append(f"validation {metric} {challenger_value:.4f} is {worse_by:.4f} worse than the champion's "
                           f"{champion_value:.4f} (tolerance {tolerance:g})")
    interval = holdout.minus_served
    if interval is None:
        reasons.append("no hold-out user with a relevant rating to compare on")
    elif interval.high < 0:
        reasons.append(f"hold-out NDCG@10 minus the champion as served {interval.difference:+.4f} "
                       f"[{interval.low:+.4f}, {interval.high:+.4f}] is significantly negative")
    return GateResult(not reasons, tuple(reasons))


def interval_text(interval: BootstrapInterval | None) -> str:
    return "n/a" if interval is None else f"{interval.difference:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]"
