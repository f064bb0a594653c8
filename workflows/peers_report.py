"""The peers record (`docs/benchmarks/peers.json`: each protocol's peers, as `workflows.peers.measure_protocol`
returns them) and its report (`docs/benchmarks/peers.md`: one table per protocol). A run of `make peers` replaces
the rows of the peers it measured and keeps the others, so one protocol (or one peer) can be measured again alone."""

from __future__ import annotations

import json
from pathlib import Path

from ncf.files import write_atomically
from workflows.peers import PRESETS, REFERENCE

NDCG = "full_ndcg_at_10"
PROTOCOLS = {
    "seed": "Seed split (`data.split.protocol: seed`): per user, the latest 20% of ratings are test, the last 10% "
            "of the rest validation.",
    "temporal": "One global time cut (`data.split.protocol: temporal`): the latest 20% of all ratings are test, "
                "every fitted rating is older. A user a peer cannot rank (the retrievers: no rating >= 4 before "
                "the cut; SASRec: none at all) gets the most rated movies, as served.",
}


def update_record(path: Path, protocol: str, peers: dict[str, dict], meta: dict) -> dict:
    """The record with `protocol`'s measured peers replaced and its run's facts (`meta`) added; written back."""
    record = json.loads(path.read_text()) if path.exists() else {}
    section = record.setdefault(protocol, {"peers": {}, "runs": []})
    section["peers"] |= peers
    section["runs"].append(meta)
    write_atomically(path, json.dumps(record, indent=1, default=float) + "\n", "peers record")
    return record


def cell(peer: dict, key: str) -> str:
    value = peer["metrics"][key]
    spread = peer.get("extra", {}).get(f"test_{key}_sd")
    return f"{value:.4f}" + (f" ± {spread:.4f}" if spread is not None else "")


def setting(name: str, peer: dict) -> str:
    settings = peer["settings"]
    if name in PRESETS:
        return f"`make train PRESET={name}` on this split, its pyfunc's ranking"
    if name == "sasrec":
        return (f"{settings['epochs']} epochs (of {settings['epochs_grid']}), seeds {settings['seeds']}: "
                f"mean ± sd, interval from seed {settings['paired_interval_seed']}")
    own = {key.split(".")[-1]: value for key, value in settings.items() if key.startswith(f"retrieval.{name}.")}
    return ", ".join(f"{key} {value}" for key, value in own.items()) or settings.get("order", "")


def table(peers: dict[str, dict]) -> list[str]:
    lines = [f"| model | NDCG@10 | HR@10 | Recall@10 | coverage | fit seconds | NDCG@10 - {REFERENCE} [95% CI] "
             "| validation NDCG@10 | settings |", "|---|---|---|---|---|---|---|---|---|"]
    for name, peer in sorted(peers.items(), key=lambda item: -item[1]["metrics"][NDCG]):
        diff = peer["difference"]
        key = f"test_{NDCG}_minus_{REFERENCE}"
        versus = (f"{diff[key]:+.4f} [{diff[key + '_low']:+.4f}, {diff[key + '_high']:+.4f}]" if diff
                  else "(reference)")
        validation = "-" if peer["validation_ndcg"] is None else f"{peer['validation_ndcg']:.4f}"
        lines.append(f"| {name} | {cell(peer, NDCG)} | {cell(peer, 'full_hit_rate_at_10')} | "
                     f"{cell(peer, 'full_recall_at_10')} | {peer['metrics']['full_coverage']:.2%} | "
                     f"{peer['fit_seconds']:.1f} | {versus} | {validation} | {setting(name, peer)} |")
    return lines


def report(record: dict) -> str:
    lines = [
        "# Peers side by side", "",
        "Produced by `make peers` (seed split) and `make peers PROTOCOL=temporal` (`python -m jobs.peers`), "
        "MovieLens latest-small, on this 2-core machine shared with other work. Every peer is a run of the MLflow "
        "experiment `peers` (tag `peers.protocol`), with the metric names of the project's training runs "
        "(`test_full_ndcg_at_10`, `test_full_hit_rate_at_10`, `test_full_recall_at_10`, `test_full_coverage`, ...).",
        "",
        "Protocol (full ranking, exact, the project's own code): every movie a user has not rated in the fit data "
        "is ranked; relevant = a held-out rating >= 4; @10. Settings are chosen on the validation slice (fit on "
        "train), refit on train + validation and scored once on test. The retrievers score profiles of ratings >= 4 "
        "weighted by recency (half-life 200 ratings) and rating (rating - 2), the recommender preset's retrieval "
        "section; their grids are small ones around what `make bench-retrieval` chose. The presets are trained "
        "as `make train` trains them (in-process, not registered), ranked by the logged pyfunc's recommender. "
        f"Intervals: paired bootstrap over users of NDCG@10 minus {REFERENCE}'s (2,000 resamples, 95%). Fit "
        "seconds: the refit on train + validation (presets: the whole training job, validation choices and "
        "evaluation included; SASRec: the mean over seeds of training alone).", ""]
    for protocol, text in PROTOCOLS.items():
        if protocol not in record:
            continue
        section = record[protocol]
        last = section["runs"][-1]
        lines += [f"## {protocol}", "", text, "", *table(section["peers"]), "",
                  f"Users ranked on test: {last['test_users']}. Runs: "
                  + "; ".join(f"{run['peers']} in {run['seconds']:.0f} s" for run in section["runs"]) + ".", ""]
    return "\n".join(lines)


def write(record_path: Path, out: Path, protocol: str, peers: dict[str, dict], meta: dict) -> None:
    record = update_record(record_path, protocol, peers, meta)
    write_atomically(out, report(record), "report")
