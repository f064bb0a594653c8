"""Peers side by side (`make peers`), the runs: every peer a run of the MLflow experiment `peers`, named by what
it is ("peer sasrec ml-latest-small (seed)"), tagged `peers.protocol`, with the split's data as its dataset inputs
and the metric names of the project's training runs (`test_full_ndcg_at_10`, ...), its settings as params and its
paired bootstrap difference of NDCG@10 against EASE (same users). The presets are trained here as `make train`
trains them (in this process, not registered: the model is logged in the peer's run) and scored by the logged
pyfunc's own ranking. The other peers' measurements: `workflows.peers`, `workflows.peers_sasrec`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext

import mlflow

from ncf.config import load_config
from ncf.evaluation import full_ranking_against, seen_in_training
from ncf.integrations import mlflow_tracking
from ncf.metrics import paired_bootstrap
from workflows.peers import PEERS, PRESETS, REFERENCE, RETRIEVER_GRIDS, PeerResult, Protocol, most_popular, retriever
from workflows.retrieval_bench import NDCG, say
from workflows.training_run import train_in_run

EXPERIMENT = "peers"
PROTOCOL_TAG = "peers.protocol"


def peer_run_name(peer: str, protocol: Protocol) -> str:
    """What the run is, as the runs table shows it: "peer sasrec ml-latest-small (seed)"."""
    return f"peer {peer} {protocol.config.data.name} ({protocol.name})"


def preset(name: str) -> Callable[[Protocol], PeerResult]:
    """A served preset trained on the protocol's split as `make train` trains it (in this process, its re-ranking
    chosen on validation, refit on train + validation), in the active run, and scored on test by the logged
    pyfunc's recommender: the registered model's own ranking."""
    def measure(p: Protocol) -> PeerResult:
        config = load_config(p.overrides, preset=name)
        run_id = mlflow.active_run().info.run_id
        started = time.perf_counter()
        summary = train_in_run(config, p.data, p.data_dir, "local", run_id, register=False)
        seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory(prefix="ncf-peer-") as tmp:
            recommender = mlflow_tracking.load_recommender(f"runs:/{run_id}/model", tmp)
        metrics, per_user = full_ranking_against(recommender.rank, seen_in_training(p.data), p.data.splits.test,
                                                 p.data.n_movies, evaluation=config.evaluation)
        return PeerResult(name, metrics, per_user[NDCG], seconds, {"preset": name},
                          summary.validation.get(f"val_{NDCG}"))

    return measure


# ----------------------------------------------------------------------------- runs


def log_peer(result: PeerResult, reference: PeerResult | None) -> dict[str, float]:
    """Into the active run: the test figures under the training runs' names (`test_full_ndcg_at_10`, ...), the
    settings as params, the fit time and the paired difference of NDCG@10 against the reference peer; returns
    that difference (empty for the reference itself)."""
    mlflow_tracking.log_test_metrics({result.name: result.metrics}, primary=result.name)
    mlflow.log_params({key: str(value) for key, value in result.settings.items()})
    mlflow.log_metrics({"fit_seconds": result.fit_seconds, **result.extra} | (
        {f"val_{NDCG}": result.validation_ndcg} if result.validation_ndcg is not None else {}))
    if reference is None or result.name == reference.name:
        return {}
    gain = paired_bootstrap(result.ndcg, reference.ndcg)
    difference = {f"test_{NDCG}_minus_{reference.name}": gain.difference,
                  f"test_{NDCG}_minus_{reference.name}_low": gain.low,
                  f"test_{NDCG}_minus_{reference.name}_high": gain.high}
    mlflow.log_metrics(difference)
    mlflow.set_tag("peers.compared_with", reference.name)
    return difference


def measure_protocol(p: Protocol, peers: list[str],
                     sasrec: Callable[[Protocol], PeerResult] | None) -> dict[str, dict]:
    """Each peer of `peers` measured and logged as a run of the `peers` experiment (the reference first: the
    others are compared with it); the record of each, for the report."""
    measures: dict[str, Callable[[Protocol], PeerResult]] = {
        "most_popular": most_popular, **{name: retriever(name) for name in RETRIEVER_GRIDS},
        **{name: preset(name) for name in PRESETS}}
    if sasrec is not None:
        measures["sasrec"] = sasrec
    unknown = [peer for peer in peers if peer not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}: choose among {', '.join(PEERS)}")
    mlflow_tracking.setup(EXPERIMENT)
    order = [REFERENCE, *(peer for peer in peers if peer != REFERENCE and peer in measures)]
    reference, record = None, {}
    for peer in order:
        say(f"{peer} ({p.name} split)")
        logged = peer in peers
        with mlflow.start_run(run_name=peer_run_name(peer, p), tags={PROTOCOL_TAG: p.name, "peers.peer": peer}) \
                if logged else nullcontext():  # the reference only measured, to compare the others with
            result = measures[peer](p)
            if logged:
                if peer not in PRESETS:  # a preset's training logs its data inputs itself
                    mlflow_tracking.log_data_inputs(p.data, p.config)
                difference = log_peer(result, reference)
                run_id = mlflow.active_run().info.run_id
        reference = reference or result
        if logged:
            record[peer] = {"metrics": result.metrics, "fit_seconds": result.fit_seconds,
                            "validation_ndcg": result.validation_ndcg, "settings": result.settings,
                            "extra": result.extra, "difference": difference, "run_id": run_id}
        say(f"  {peer}: test NDCG@10 {result.metrics[NDCG]:.4f}, HR@10 {result.metrics['full_hit_rate_at_10']:.4f}"
            f", fit {result.fit_seconds:.1f} s")
    return record

