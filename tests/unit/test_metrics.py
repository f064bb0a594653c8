"""Metrics on small cases worked out by hand (the formulas: docs/evaluation.md)."""

from __future__ import annotations

from math import log2, sqrt

import numpy as np
import pytest

from ncf.metrics import full_ranking_metrics, mae, rmse, seed_ranking_metrics

SEED_RELEVANT = 3.0  # the deck's relevance threshold (evaluation.seed_relevant_rating), as computed by hand


def test_rmse_and_mae():
    assert rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])) == pytest.approx(sqrt(4 / 3))
    assert mae(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])) == pytest.approx(2 / 3)
    assert rmse([3.0, 3.0], [1.0, 5.0]) == pytest.approx(2.0)
    assert mae([3.0, 3.0], [1.0, 5.0]) == pytest.approx(2.0)
    assert rmse([4.0, 0.5], [4.0, 0.5]) == 0.0
    # RMSE weighs large errors more than MAE does.
    assert rmse([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]) == pytest.approx(2.0)
    assert mae([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]) == pytest.approx(1.0)


# Three users, rows interleaved and user ids neither sorted nor contiguous.
#   user 7: (true, pred) = (5, 4.5) (2, 4.0) (4, 3.0) (3, 2.0)
#           ranked by pred: 5, 2, 4, 3; top-3 holds true ratings 5, 2, 4; relevant (>= 3): 5, 4, 3
#   user 3: (1, 3.5) (2.5, 1.0): nothing relevant
#   user 5: (4, 1.0): one relevant item
SEED_USERS = np.array([7, 3, 7, 5, 7, 3, 7])
SEED_TRUE = np.array([2.0, 1.0, 5.0, 4.0, 3.0, 2.5, 4.0])
SEED_PRED = np.array([4.0, 3.5, 4.5, 1.0, 2.0, 1.0, 3.0])


def test_seed_ranking_metrics_by_hand():
    got = seed_ranking_metrics(SEED_USERS, SEED_TRUE, SEED_PRED, k=3, relevant_rating=SEED_RELEVANT)
    # Precision = hits / min(k, n_test): user 7 2/3 (5 and 4 in the top 3), user 3 0/2, user 5 1/1.
    precision = (2 / 3 + 0 + 1) / 3
    # Recall = hits / n_relevant, user 3 left out: user 7 2/3, user 5 1/1.
    recall = (2 / 3 + 1) / 2
    # NDCG: gain = true rating, discount 1/log2(rank + 1), ideal = true ratings sorted, cut at k.
    ndcg_7 = (5 / 1 + 2 / log2(3) + 4 / 2) / (5 / 1 + 4 / log2(3) + 3 / 2)
    ndcg_3 = (1 / 1 + 2.5 / log2(3)) / (2.5 / 1 + 1 / log2(3))
    ndcg_5 = 1.0
    assert got["precision_at_3"] == pytest.approx(precision) == pytest.approx(5 / 9)
    assert got["recall_at_3"] == pytest.approx(recall) == pytest.approx(5 / 6)
    assert got["f_at_3"] == pytest.approx(2 / 3)  # 2PR/(P+R) of the averages
    assert got["ndcg_at_3"] == pytest.approx((ndcg_7 + ndcg_3 + ndcg_5) / 3)
    assert set(got) == {"precision_at_3", "recall_at_3", "f_at_3", "ndcg_at_3"}


def test_seed_ranking_metrics_do_not_depend_on_row_order():
    perm = np.array([6, 2, 0, 4, 1, 5, 3])
    assert seed_ranking_metrics(SEED_USERS[perm], SEED_TRUE[perm], SEED_PRED[perm], k=3,
                                relevant_rating=SEED_RELEVANT) == pytest.approx(
        seed_ranking_metrics(SEED_USERS, SEED_TRUE, SEED_PRED, k=3, relevant_rating=SEED_RELEVANT))


def test_seed_precision_counts_users_with_fewer_than_k_items_fully():
    # One user, two test items, both relevant: precision 2/min(10, 2) = 1, not 2/10.
    got = seed_ranking_metrics(np.array([1, 1]), np.array([4.0, 3.0]), np.array([1.0, 2.0]),
                               relevant_rating=SEED_RELEVANT)
    assert got["precision_at_10"] == pytest.approx(1.0)
    assert got["recall_at_10"] == pytest.approx(1.0)
    # Ranked 3 then 4 against the ideal 4 then 3.
    assert got["ndcg_at_10"] == pytest.approx((3 + 4 / log2(3)) / (4 + 3 / log2(3)))


def test_seed_threshold_is_inclusive_and_cut_is_at_k():
    # k = 2: ranked true ratings 3.0, 2.5, 5.0; only the first two count.
    got = seed_ranking_metrics(np.array([0, 0, 0]), np.array([3.0, 2.5, 5.0]), np.array([3.0, 2.0, 1.0]), k=2,
                               relevant_rating=SEED_RELEVANT)
    assert got["precision_at_2"] == pytest.approx(1 / 2)  # 3.0 counts as relevant
    assert got["recall_at_2"] == pytest.approx(1 / 2)  # relevant: 3.0 and 5.0
    assert got["ndcg_at_2"] == pytest.approx((3 + 2.5 / log2(3)) / (5 + 3 / log2(3)))


def test_seed_recall_without_any_relevant_item_is_zero():
    got = seed_ranking_metrics(np.array([1, 1]), np.array([1.0, 2.0]), np.array([2.0, 1.0]), k=2,
                               relevant_rating=SEED_RELEVANT)
    assert got["precision_at_2"] == 0.0
    assert got["recall_at_2"] == 0.0
    assert got["f_at_2"] == 0.0


# Three users, k = 3, a catalogue of 10 items.
#   row 0: top [1, 2, 3], relevant {2, 5}:          hit at rank 2
#   row 1: top [4, 5, 6], relevant {4, 6, 7, 8, 9}: hits at ranks 1 and 3
#   row 2: top [7, 8, 9], relevant {0}:             no hit
FULL_TOP = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
FULL_REL_USERS = np.array([1, 0, 1, 2, 1, 0, 1, 1])
FULL_REL_ITEMS = np.array([4, 2, 6, 0, 7, 5, 8, 9])


def test_full_ranking_metrics_by_hand():
    got = full_ranking_metrics(FULL_TOP, FULL_REL_USERS, FULL_REL_ITEMS, n_items=10)
    assert got["full_precision_at_3"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)  # hits / k
    assert got["full_recall_at_3"] == pytest.approx((1 / 2 + 2 / 5 + 0) / 3)  # hits / n_relevant
    # Binary gain; ideal DCG over min(k, n_relevant) hits: 2 for row 0, 3 for row 1.
    ndcg_0 = (1 / log2(3)) / (1 + 1 / log2(3))
    ndcg_1 = (1 + 1 / 2) / (1 + 1 / log2(3) + 1 / 2)
    assert got["full_ndcg_at_3"] == pytest.approx((ndcg_0 + ndcg_1 + 0) / 3)
    assert got["full_hit_rate_at_3"] == pytest.approx(2 / 3)
    # AP = sum of precision at each hit / min(k, n_relevant): row 0 (1/2)/2, row 1 (1/1 + 2/3)/3.
    assert got["full_map_at_3"] == pytest.approx((1 / 4 + 5 / 9 + 0) / 3)
    assert got["full_coverage"] == pytest.approx(9 / 10)  # items 1..9 recommended, item 0 never


def test_full_ranking_perfect_lists_score_one():
    top = np.array([[3, 1, 0], [2, 0, 1]])
    got = full_ranking_metrics(top, np.array([0, 0, 0, 0, 1]), np.array([3, 1, 0, 2, 2]), n_items=4)
    # Row 0 has 4 relevant items, 3 of them in its top 3: recall 3/4 but NDCG and MAP are 1.
    # Row 1 has 1 relevant item, ranked first: precision 1/3, everything else 1.
    assert got["full_ndcg_at_3"] == pytest.approx(1.0)
    assert got["full_map_at_3"] == pytest.approx(1.0)
    assert got["full_hit_rate_at_3"] == pytest.approx(1.0)
    assert got["full_recall_at_3"] == pytest.approx((3 / 4 + 1) / 2)
    assert got["full_precision_at_3"] == pytest.approx((1 + 1 / 3) / 2)
    assert got["full_coverage"] == pytest.approx(1.0)


def test_full_ranking_hit_lower_in_the_list_scores_less():
    first = full_ranking_metrics(np.array([[5, 6, 7]]), np.array([0]), np.array([5]), n_items=8)
    last = full_ranking_metrics(np.array([[6, 7, 5]]), np.array([0]), np.array([5]), n_items=8)
    assert first["full_ndcg_at_3"] == pytest.approx(1.0)
    assert last["full_ndcg_at_3"] == pytest.approx(1 / log2(4))
    assert last["full_map_at_3"] == pytest.approx(1 / 3)
    assert first["full_precision_at_3"] == last["full_precision_at_3"] == pytest.approx(1 / 3)


def test_full_ranking_needs_a_relevant_item_per_row():
    with pytest.raises(ValueError, match="at least one relevant item"):
        full_ranking_metrics(np.array([[0, 1], [2, 3]]), np.array([0]), np.array([1]), n_items=4)
