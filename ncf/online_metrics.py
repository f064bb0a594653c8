"""The online metrics of an experiment's variants, from the lists they served and the ratings posted with their
rec_ids (`ncf.experiment`), and the promotion rule that reads them. Pure statistics: the store gives the rows.

A rating is attributed to a list when it was posted with the list's rec_id (a shadow list: the rec_id of the list
shown instead), by the list's user, of a movie in the list, received within `window_s` after the list was served.
Per variant: lists served; ratings attributed; the share of lists that got an attributed rating (Wilson 95%
interval); the share of attributed ratings >= `positive_rating` (Wilson); the mean attributed rating (normal 95%
interval); the distinct movies shown (and their share of the catalogue); and the positive rate, the share of lists
with an attributed rating >= `positive_rating` (Wilson), on which promotion decides: the difference challenger -
champion gets Newcombe's interval (hybrid score, from the two Wilson intervals).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

from ncf.experiment import CHALLENGER, CHAMPION, ExperimentConfig, ServedList
from ncf.feedback_store import LiveRating, RatingsStore

Z_TWO_SIDED_95 = 1.959964  # the 95% intervals reported
Z_ONE_SIDED_95 = 1.644854  # the lower bound promotion compares with -margin
OFFLINE_GATE_PASSED = "passed"  # the challenger's version tag challenger.offline_gate when make retrain passed it


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def wilson(successes: int, n: int, z: float = Z_TWO_SIDED_95) -> Interval:
    """The Wilson score interval of a proportion; with n = 0 nothing is known: 0 within [0, 1]."""
    if n == 0:
        return Interval(0.0, 0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float], z: float = Z_TWO_SIDED_95) -> Interval | None:
    """The mean with its normal-approximation interval; None without values."""
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return Interval(mean, mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = z * sd / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


def newcombe(successes_b: int, n_b: int, successes_a: int, n_a: int, z: float = Z_TWO_SIDED_95) -> Interval:
    """Newcombe's hybrid score interval of the difference of two independent proportions, b - a."""
    a, b = wilson(successes_a, n_a, z), wilson(successes_b, n_b, z)
    d = b.estimate - a.estimate
    return Interval(d, d - math.sqrt((b.estimate - b.low) ** 2 + (a.high - a.estimate) ** 2),
                    d + math.sqrt((b.high - b.estimate) ** 2 + (a.estimate - a.low) ** 2))


@dataclass(frozen=True)
class VariantMetrics:
    variant: str
    model_version: str
    lists_served: int
    ratings_attributed: int
    rated_lists: int
    positive_lists: int
    rated_list_rate: Interval  # lists with an attributed rating, of lists served
    positive_share: Interval  # attributed ratings >= positive_rating, of attributed ratings
    mean_rating: Interval | None  # of attributed ratings; None without any
    movies_shown: int  # distinct movies in the lists served
    catalogue_coverage: float | None  # movies_shown / catalogue size, when the caller knows it
    positive_rate: Interval  # lists with an attributed rating >= positive_rating, of lists served

    def figures(self) -> dict[str, float]:
        """The metrics as flat numbers (MLflow metrics, version tags): intervals as `<name>`, `_low`, `_high`."""
        flat: dict[str, float] = {}
        for name, value in asdict(self).items():
            if isinstance(value, dict):
                flat |= {name: value["estimate"], f"{name}_low": value["low"], f"{name}_high": value["high"]}
            elif isinstance(value, int | float) and not isinstance(value, bool):
                flat[name] = float(value)
        return flat


@dataclass(frozen=True)
class ExperimentMetrics:
    experiment_id: str
    champion: VariantMetrics
    challenger: VariantMetrics
    positive_rate_difference: Interval  # challenger - champion, Newcombe 95%
    positive_rate_difference_lower: float  # its one-sided 95% lower bound: what promotion compares

    def figures(self) -> dict[str, float]:
        """The comparison as flat numbers (the experiment's own MLflow run)."""
        d = self.positive_rate_difference
        return {"positive_rate_difference": d.estimate, "positive_rate_difference_low": d.low,
                "positive_rate_difference_high": d.high,
                "positive_rate_difference_lower_one_sided": self.positive_rate_difference_lower}


def attributed(lists: Iterable[ServedList], ratings: Iterable[LiveRating],
               window_s: float) -> dict[tuple[str, str], list[LiveRating]]:
    """Each list's attributed ratings, by (variant, rec_id) (see the module's docstring)."""
    by_rec_id: dict[str, list[LiveRating]] = {}
    for rating in ratings:
        if rating.rec_id is not None:
            by_rec_id.setdefault(rating.rec_id, []).append(rating)
    found = {}
    for listed in lists:
        movies = set(listed.movie_ids)
        found[(listed.variant, listed.rec_id)] = [
            r for r in by_rec_id.get(listed.shown_rec_id or listed.rec_id, ())
            if r.user_id == listed.user_id and r.movie_id in movies
            and listed.served_at <= r.received_at <= listed.served_at + window_s]
    return found


def variant_metrics(variant: str, model_version: str, lists: list[ServedList],
                    ratings_of: dict[tuple[str, str], list[LiveRating]], positive_rating: float,
                    catalogue: int | None = None) -> VariantMetrics:
    """One variant's metrics from its lists and their attributed ratings (`attributed`)."""
    per_list = [ratings_of.get((variant, listed.rec_id), []) for listed in lists]
    values = [r.rating for rs in per_list for r in rs]
    rated = sum(1 for rs in per_list if rs)
    positive = sum(1 for rs in per_list if any(r.rating >= positive_rating for r in rs))
    shown = len({m for listed in lists for m in listed.movie_ids})
    return VariantMetrics(
        variant=variant, model_version=model_version, lists_served=len(lists), ratings_attributed=len(values),
        rated_lists=rated, positive_lists=positive, rated_list_rate=wilson(rated, len(lists)),
        positive_share=wilson(sum(1 for v in values if v >= positive_rating), len(values)),
        mean_rating=mean_interval(values), movies_shown=shown,
        catalogue_coverage=shown / catalogue if catalogue else None, positive_rate=wilson(positive, len(lists)))


def experiment_metrics(experiment_id: str, versions: dict[str, str], lists: list[ServedList],
                       ratings: Iterable[LiveRating], config: ExperimentConfig,
                       catalogue: int | None = None) -> ExperimentMetrics:
    """Both variants' metrics and the difference of their positive rates. `versions`: variant -> model version;
    `lists`: the experiment's lists; `ratings`: the live ratings posted with their rec_ids (others are ignored)."""
    ratings_of = attributed(lists, ratings, config.window_s)
    variants = {variant: variant_metrics(variant, versions[variant], [x for x in lists if x.variant == variant],
                                         ratings_of, config.positive_rating, catalogue)
                for variant in (CHAMPION, CHALLENGER)}
    a, b = variants[CHAMPION], variants[CHALLENGER]
    args = (b.positive_lists, b.lists_served, a.positive_lists, a.lists_served)
    return ExperimentMetrics(experiment_id, a, b, newcombe(*args), newcombe(*args, z=Z_ONE_SIDED_95).low)


def stored_metrics(store: RatingsStore, experiment_id: str, versions: dict[str, str], config: ExperimentConfig,
                   catalogue: int | None = None) -> ExperimentMetrics:
    """`experiment_metrics` of the lists and ratings the store holds now: the same figures wherever computed (GET
    /experiment, the MLflow logging, make promote)."""
    return experiment_metrics(experiment_id, versions, store.served_lists(experiment_id),
                              store.ratings_for_lists(experiment_id), config, catalogue)


@dataclass(frozen=True)
class Decision:
    """What the evidence says to do with the challenger, and why."""

    action: Literal["promote", "rollback"]
    reason: str

    def tags(self, metrics: ExperimentMetrics, margin: float) -> dict[str, str]:
        """The decision with its figures, as tags (both versions, the experiment's run)."""
        figures = {f"{v.variant}.{name}": value for v in (metrics.champion, metrics.challenger)
                   for name, value in v.figures().items() if name in DECISION_FIGURES}
        return {"experiment.id": metrics.experiment_id, "experiment.decision": self.action,
                "experiment.reason": self.reason, "experiment.margin": f"{margin:g}",
                **{f"experiment.{k}": f"{v:.6g}" for k, v in (figures | metrics.figures()).items()}}


DECISION_FIGURES = ("lists_served", "ratings_attributed", "positive_rate", "positive_rate_low", "positive_rate_high")


def ready(metrics: ExperimentMetrics, min_lists: int) -> bool:
    """Whether both variants served `min_lists` lists: when Serve's auto-promotion decides."""
    return min(metrics.champion.lists_served, metrics.challenger.lists_served) >= min_lists


def decide(metrics: ExperimentMetrics, offline_gate: str | None, margin: float) -> Decision:
    """Promote only a challenger that passed the offline gate (`offline_gate`: its challenger.offline_gate tag) and
    whose positive rate is not worse than the champion's by more than `margin` at 95% confidence (one-sided lower
    bound of the difference >= -margin); otherwise roll it back."""
    lower = metrics.positive_rate_difference_lower
    if offline_gate != OFFLINE_GATE_PASSED:
        return Decision("rollback", f"the challenger's offline gate is {offline_gate or 'not recorded'}, not passed")
    if lower < -margin:
        return Decision("rollback", f"positive rate difference lower bound {lower:.4f} < -{margin:g}: not shown "
                                    "to be no worse than the champion")
    return Decision("promote", f"positive rate difference lower bound {lower:.4f} >= -{margin:g}")
