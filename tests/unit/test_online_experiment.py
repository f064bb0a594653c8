"""The online experiment's core: sticky assignment of users to variants, the statistics of the online metrics,
the attribution of ratings to served lists, the promotion rule, and the store's experiment tables (SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

import ncf.feedback_store as feedback_store
from ncf.config import load_config
from ncf.experiment import CHALLENGER, CHAMPION, ExperimentConfig, ServedList, experiment_id, variant_of
from ncf.feedback_store import LiveRating, RatingEvent, RatingsStore
from ncf.online_metrics import (
    OFFLINE_GATE_PASSED,
    decide,
    experiment_metrics,
    mean_interval,
    newcombe,
    ready,
    wilson,
)


def test_the_split_sends_the_configured_share_and_a_user_never_changes_side():
    experiment = experiment_id("3", "4")
    for share in (0.1, 0.5, 0.8):
        sides = [variant_of(experiment, user, share) for user in range(10_000)]
        assert abs(sides.count(CHALLENGER) / len(sides) - share) < 0.02, share
        assert sides == [variant_of(experiment, user, share) for user in range(10_000)]  # sticky
    assert {variant_of(experiment, 7, 0.0), variant_of(experiment, 7, 1.0)} == {CHAMPION, CHALLENGER}
    # Another experiment draws its users afresh: about half of one experiment's challengers are in the other's.
    first = {u for u in range(10_000) if variant_of(experiment, u, 0.5) == CHALLENGER}
    second = {u for u in range(10_000) if variant_of(experiment_id("4", "5"), u, 0.5) == CHALLENGER}
    assert abs(len(first & second) / len(first) - 0.5) < 0.03


def test_a_config_without_the_experiment_section_loads_with_the_defaults_conf_states():
    assert load_config().serve.experiment == ExperimentConfig()
    saved = load_config().serve.model_dump()
    del saved["experiment"]
    assert type(load_config().serve).model_validate(saved).experiment == ExperimentConfig()


def test_intervals_match_published_values():
    # Newcombe (1998): 81/263 -> Wilson 0.2553 to 0.3662; 56/70 - 48/80 -> hybrid score 0.0524 to 0.3339.
    w = wilson(81, 263)
    assert (round(w.low, 4), round(w.high, 4)) == (0.2553, 0.3662)
    d = newcombe(56, 70, 48, 80)
    assert (round(d.estimate, 4), round(d.low, 4), round(d.high, 4)) == (0.2, 0.0524, 0.3339)
    assert wilson(0, 0).low == 0 and wilson(0, 0).high == 1
    m = mean_interval([3.0, 4.0, 5.0])
    assert m.estimate == 4.0 and m.low == pytest.approx(4 - 1.959964 / 3 ** 0.5)
    assert mean_interval([]) is None


def served(rec_id: str, variant: str, user: int, movies: tuple[int, ...], at: float = 1000.0,
           shown: str | None = None) -> ServedList:
    return ServedList("3-vs-4", rec_id, variant, "3" if variant == CHAMPION else "4", user, movies, at, shown)


def rated(seq: int, user: int, movie: int, value: float, rec_id: str | None, at: float = 1010.0) -> LiveRating:
    return LiveRating(seq, f"e{seq}", user, movie, value, int(at), rec_id, at)


def test_a_rating_counts_for_the_list_that_showed_its_movie_to_its_user_within_the_window():
    config = ExperimentConfig(window_s=100)
    lists = [served("3.1.0.10", CHAMPION, 1, (10, 11)), served("4.2.0.10", CHALLENGER, 2, (20, 21)),
             served("4.1.0.10", CHALLENGER, 1, (10, 12), shown="3.1.0.10"),  # a shadow list beside user 1's
             served("3.5.0.10", CHAMPION, 5, (10, 11))]
    ratings = [rated(1, 1, 10, 5.0, "3.1.0.10"),  # counts for the champion's list and the shadow list
               rated(2, 1, 11, 2.0, "3.1.0.10"),  # the champion's only (11 is not in the shadow list)
               rated(3, 2, 20, 4.0, "4.2.0.10"),
               rated(4, 2, 99, 5.0, "4.2.0.10"),  # a movie the list did not show
               rated(5, 9, 21, 5.0, "4.2.0.10"),  # another user
               rated(6, 2, 21, 5.0, "4.2.0.10", at=1200.0),  # after the window
               rated(7, 5, 10, 1.0, None)]  # no rec_id
    metrics = experiment_metrics("3-vs-4", {CHAMPION: "3", CHALLENGER: "4"}, lists, ratings, config, catalogue=100)
    a, b = metrics.champion, metrics.challenger
    assert (a.lists_served, a.ratings_attributed, a.rated_lists, a.positive_lists) == (2, 2, 1, 1)
    assert (b.lists_served, b.ratings_attributed, b.rated_lists, b.positive_lists) == (2, 2, 2, 2)
    assert a.mean_rating.estimate == 3.5 and a.positive_share.estimate == 0.5 and b.positive_share.estimate == 1
    assert (a.movies_shown, a.catalogue_coverage, b.movies_shown) == (2, 0.02, 4)
    assert (a.positive_rate.estimate, b.positive_rate.estimate) == (0.5, 1.0)
    assert metrics.positive_rate_difference.estimate == 0.5
    assert metrics.positive_rate_difference_lower > metrics.positive_rate_difference.low  # one-sided: tighter
    assert {"positive_rate", "positive_rate_low", "positive_rate_high", "lists_served"} <= set(a.figures())


def many(variant: str, n: int, positive: int) -> tuple[list[ServedList], list[LiveRating]]:
    lists = [served(f"{variant}.{u}", variant, u, (1, 2)) for u in range(n)]
    return lists, [rated(u, u, 1, 5.0, f"{variant}.{u}") for u in range(positive)]


@pytest.mark.parametrize(("champion_positive", "challenger_positive", "gate", "action"), [
    (300, 330, OFFLINE_GATE_PASSED, "promote"),  # better
    (300, 295, OFFLINE_GATE_PASSED, "promote"),  # as good, within the margin
    (300, 200, OFFLINE_GATE_PASSED, "rollback"),  # worse
    (300, 330, "failed", "rollback"),  # better online, but it failed the offline gate
    (300, 330, None, "rollback")])
def test_promotion_needs_the_offline_gate_and_a_positive_rate_not_worse_beyond_the_margin(
        champion_positive, challenger_positive, gate, action):
    a_lists, a_ratings = many(CHAMPION, 1000, champion_positive)
    b_lists, b_ratings = many(CHALLENGER, 1000, challenger_positive)
    config = ExperimentConfig(margin=0.05, min_lists=1000)
    metrics = experiment_metrics("3-vs-4", {CHAMPION: "3", CHALLENGER: "4"}, a_lists + b_lists,
                                 a_ratings + b_ratings, config)
    assert ready(metrics, config.min_lists) and not ready(metrics, 1001)
    decision = decide(metrics, gate, config.margin)
    assert decision.action == action, decision.reason
    tags = decision.tags(metrics, config.margin)
    assert tags["experiment.decision"] == action and tags["experiment.challenger.lists_served"] == "1000"
    assert float(tags["experiment.positive_rate_difference"]) == pytest.approx((challenger_positive -
                                                                               champion_positive) / 1000)


def test_a_store_made_before_experiments_is_migrated_and_keeps_its_ratings(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    uri = f"sqlite:///{tmp_path / 'ratings.db'}"
    with monkeypatch.context() as old_code:
        old_code.setattr(feedback_store, "MIGRATIONS", feedback_store.MIGRATIONS[:1])
        old_code.setattr(feedback_store, "SCHEMA_VERSION", 1)
        old = RatingsStore(uri)
        old.add([RatingEvent("a", 1, 10, 5.0, None, "3.1.0.10")])
        old.close()
    store = RatingsStore(uri)
    assert store.count() == 1 and store.add_served_lists([served("3.1.0.10", CHAMPION, 1, (10,))]) == 1
    assert [r.event_id for r in store.ratings_for_lists("3-vs-4")] == ["a"]
    store.close()
    with create_engine(uri).connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_version")).scalars().all() == [2]
