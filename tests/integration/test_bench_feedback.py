"""`make bench-feedback` (jobs.bench_feedback) in miniature, in-process: the store's tiny champion served twice by
make serve's runtime (live, then frozen) on the real data, a few users replayed, a few seconds of ingestion; the
report has every figure, and the stores hold exactly what was acknowledged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs import bench_feedback
from workflows.feedback_bench import ratings_to_replay

pytestmark = pytest.mark.integration

USERS = 4


@pytest.fixture(scope="module")
def report(model_store, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("bench") / "feedback.md"
    assert bench_feedback.main(["--users", str(USERS), "--clients", "4", "--fresh-users", "6", "--fresh-reads", "3",
                                "--seconds", "3", "--batch", "20", "--ingest-rate", "400", "--fold-in-runs", "10",
                                "--set", "serve.warm_users=20", "--out", str(out)]) == 0
    return Path(out).read_text()


def figure(pattern: str, text: str) -> list[str]:
    match = re.search(pattern, text)
    assert match, f"no {pattern!r} in the report:\n{text}"
    return list(match.groups())


def test_the_report_has_every_figure_for_the_champion(report: str, model_store):
    assert f"## tiny preset: `models:/ncf-movielens/{model_store.champion}`" in report
    live, frozen = map(float, figure(r"\| HR@10 \| ([\d.]+) \| ([\d.]+) \|", report))
    assert 0 <= live <= 1 and 0 <= frozen <= 1
    assert all(0 <= float(x) <= 1 for x in figure(r"\| NDCG@10 \| ([\d.]+) \| ([\d.]+) \|", report))
    fresh_users, p50, p99 = figure(r"Freshness \((\d+) users; \d+ skipped\): p50 ([\d.]+) ms, p99 ([\d.]+) ms", report)
    assert int(fresh_users) > 0 and 0 < float(p50) <= float(p99)
    paced, back_to_back = figure(r"Ingestion: paced, ([\d,]+) ratings acknowledged .* back to back, ([\d,]+) in",
                                 report)
    assert int(paced.replace(",", "")) > 0 and int(back_to_back.replace(",", "")) > 0
    assert float(figure(r"\(paced, 20\.0 batches/s offered\) with /recommend p99 ([\d.]+) ms", report)[0]) > 0
    assert float(figure(r"Fold-in of 100 ratings \(10 runs.*p50 ([\d.]+) ms", report)[0]) > 0
    assert len(re.findall(r"^- (met|MISSED): ", report, flags=re.MULTILINE)) == 5
    assert "Machine: " in report and "bench_feedback --users" in report


def test_the_stores_hold_exactly_the_acknowledged_ratings(report: str, model_store):
    replayed = sum(map(len, ratings_to_replay(model_store.data, USERS, seed=0)))
    assert figure(r"; (\d+) batches posted again: (\d+) of their events not answered duplicate", report)[1] == "0"
    live_held = int(figure(r"live store: ([\d,]+) held, 0 lost, 0 duplicated", report)[0].replace(",", ""))
    assert live_held > replayed  # the replay's, the freshness phase's and the ingested ratings
    assert figure(r"frozen store: ([\d,]+) held, 0 lost, 0 duplicated, 0 held", report) == [f"{replayed:,}"]
    assert "live: 0 rejected, 0 failed; frozen: 0 rejected, 0 failed" in report
