"""`make bench-history` on the tiny dataset: its validation grid chooses among the settings it measured, the test
table compares the chosen model's seeds with EASE, and the report says what was chosen."""

from __future__ import annotations

import re

import pytest

from ncf.config import load_config
from ncf.data import MovieLens
from workflows import history_bench
from workflows.retrieval_bench import slices

pytestmark = pytest.mark.unit


def test_the_benchmark_chooses_on_validation_and_reports_every_seed(tiny_movielens: MovieLens,
                                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(history_bench, "DIMENSIONS", (8,))
    monkeypatch.setattr(history_bench, "ITEM_DROPOUTS", (0.3, 0.5))
    val, test = slices(tiny_movielens, load_config().evaluation)
    quick = load_config(["retrieval.history.epochs=5"], preset="history")
    chosen, grid = history_bench.choose(quick, val)
    assert len(grid) == 2 * len(history_bench.RECENCY_HALF_LIVES) + len(history_bench.SEQUENCE_WEIGHTS) - 1
    best = max(grid, key=lambda row: float(row.split("|")[5]))
    cells = [cell.strip() for cell in best.split("|")[1:5]]
    assert cells[:2] == [str(chosen.retrieval.history.dimension), f"{chosen.retrieval.history.item_dropout:g}"]
    assert chosen.retrieval.retriever == "history" and chosen.retrieval.sequence.weight in (
        history_bench.SEQUENCE_WEIGHTS)

    rows = history_bench.test_rows(chosen, load_config(preset="recommender"), test)
    assert [row.split("|")[1].strip() for row in rows] == ["EASE alone", "history alone", "EASE + sequence signal",
                                                           "history + sequence signal"]
    per_seed = rows[1].split("|")[7]
    assert len(re.findall(r"0\.\d{4}", per_seed)) == len(history_bench.SEEDS)
    text = history_bench.report(chosen, grid, rows, test, 1.0)
    assert f"dimension {chosen.retrieval.history.dimension}" in text and all(row in text for row in grid + rows)
