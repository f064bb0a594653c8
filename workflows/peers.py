"""Peers side by side (`make peers`): most-popular, EASE, ALS, item-kNN, SASRec and the served presets, each
measured on one split (`data.split.protocol`: seed or temporal) with the project's own full-ranking code and logged
as a run of the MLflow experiment `peers`, under the metric names of the project's training runs.

Protocol (as `make bench-retrieval`'s): every movie a user has not rated is ranked; relevant = a held-out rating of
at least `evaluation.relevant_rating`. A peer's settings are chosen on the validation slice (fit on train, ranked
against validation), refit on train + validation and scored once on test. The retrievers' grids are small: around
the settings `make bench-retrieval` chose (the recommender preset's retrieval section: ratings >= 4, profiles
weighted by recency and rating; a profile a retriever cannot score gets
the most rated movies, as served). The presets are trained as `make train` trains them (in this process, not
registered: the model is logged in the peer's run) and scored by the logged pyfunc's own ranking. SASRec runs in
a virtualenv of its own (`workflows.peers_sasrec`). Each peer's paired bootstrap difference of NDCG@10 against EASE
(same users) is logged with it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np

from ncf.baselines import MostPopular
from ncf.config import Config, RetrievalConfig, load_config
from ncf.data import MovieLens
from ncf.evaluation import full_ranking_against, seen_in_training
from ncf.integrations import mlflow_tracking
from ncf.metrics import paired_bootstrap
from ncf.prepared import load_movielens
from ncf.ranking import fit_retriever
from workflows.retrieval_bench import NDCG, Slice, say, slices
from workflows.training_run import train_in_run

EXPERIMENT = "peers"
PROTOCOL_TAG = "peers.protocol"
REFERENCE = "ease"  # every peer's NDCG@10 is compared with this one's, user by user
PRESETS = ("deck", "recommender")
# The retrievers' inputs and profiles: the recommender preset's retrieval section (chosen by make bench-retrieval).
RETRIEVER_PRESET = "recommender"
# Each retriever's validation grid: overrides of that retrieval section.
RETRIEVER_GRIDS: dict[str, list[dict[str, object]]] = {
    "ease": [{"retrieval.ease.regularization": lam} for lam in (100.0, 250.0, 500.0)],
    "als": [{"retrieval.als.factors": factors} for factors in (32, 64, 128)],
    "itemknn": [{"retrieval.itemknn.neighbours": n} for n in (50, 100, 200)],
}
PEERS = ("most_popular", *RETRIEVER_GRIDS, "sasrec", *PRESETS)
# Profile settings every retriever peer shares, logged with its own section.
PROFILE_KEYS = ("min_rating", "recency_half_life", "recency_unit", "profile_rating_offset")


@dataclass
class PeerResult:
    """One peer's test figures: the full-ranking summary (`full_*`), per-user NDCG@10 (sorted user ids) for paired
    intervals, seconds to fit on train + validation (presets: the whole training job), the settings used."""

    name: str
    metrics: dict[str, float]
    ndcg: np.ndarray
    fit_seconds: float
    settings: dict[str, object]
    validation_ndcg: float | None = None  # the chosen setting's, where one was chosen
    extra: dict[str, float] = field(default_factory=dict)  # more metrics for the run (SASRec: spread over seeds)


@dataclass
class Protocol:
    """One split and everything its peers share."""

    name: str  # seed | temporal
    config: Config  # the defaults with the split's protocol and the job's overrides
    data: MovieLens
    data_dir: Path
    validation: Slice
    test: Slice
    overrides: list[str]  # the job's overrides, applied to every preset too

    @classmethod
    def load(cls, name: str, data_dir: Path, overrides: list[str]) -> Protocol:
        overrides = [*overrides, f"data.split.protocol={name}"]
        config = load_config(overrides)
        data = load_movielens(config.data, data_dir)
        validation, test = slices(data, config.evaluation)
        return cls(name, config, data, data_dir, validation, test, overrides)


def peer_run_name(peer: str, protocol: Protocol) -> str:
    """What the run is, as the runs table shows it: "peer sasrec ml-latest-small (seed)"."""
    return f"peer {peer} {protocol.config.data.name} ({protocol.name})"


# ----------------------------------------------------------------------------- the peers


def most_popular(p: Protocol) -> PeerResult:
    started = time.perf_counter()
    model = MostPopular().fit(p.test.fit_on, p.data.n_users, p.data.n_movies)
    seconds = time.perf_counter() - started
    metrics, ndcg = p.test.evaluate(model.score)
    return PeerResult("most_popular", metrics, ndcg, seconds, {"order": "number of ratings in train + validation"})


def retriever_config(name: str, setting: dict[str, object], overrides: list[str]) -> RetrievalConfig:
    """The recommender preset's retrieval section with retriever `name`, `setting` and no sequence signal."""
    setting = {"retrieval.retriever": name, "retrieval.sequence.weight": 0.0, **setting}
    return load_config([*overrides, *(f"{key}={value}" for key, value in setting.items())],
                       preset=RETRIEVER_PRESET).retrieval


def retriever_settings(name: str, cfg: RetrievalConfig) -> dict[str, object]:
    """The params a retriever peer logs: its section and the profile it scores."""
    section = getattr(cfg, name).model_dump()
    return {f"retrieval.{name}.{key}": value for key, value in section.items()} | {
        f"retrieval.{key}": getattr(cfg, key) for key in PROFILE_KEYS}


def retriever(name: str) -> Callable[[Protocol], PeerResult]:
    """A registered retriever as a peer, served as the recommender's retrieval stage serves it (a profile it cannot
    score gets the most rated movies; no sequence signal): its grid's best setting on validation, refit and scored
    on test."""
    def measure(p: Protocol) -> PeerResult:
        n_users, n_movies = p.data.n_users, p.data.n_movies
        scored = []
        for setting in RETRIEVER_GRIDS[name]:
            cfg = retriever_config(name, setting, p.overrides)
            model = fit_retriever(cfg, p.validation.fit_on, n_users, n_movies)
            scored.append((p.validation.evaluate(model.score)[0][NDCG], cfg))
            say(f"  {name} {setting}: validation NDCG@10 {scored[-1][0]:.4f}")
        best, cfg = max(scored, key=lambda pair: pair[0])
        started = time.perf_counter()
        model = fit_retriever(cfg, p.test.fit_on, n_users, n_movies)
        seconds = time.perf_counter() - started
        metrics, ndcg = p.test.evaluate(model.score)
        return PeerResult(name, metrics, ndcg, seconds, retriever_settings(name, cfg), best)

    return measure


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


def log_peer(result: PeerResult, p: Protocol, reference: PeerResult | None) -> dict[str, float]:
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
                difference = log_peer(result, p, reference)
                run_id = mlflow.active_run().info.run_id
        reference = reference or result
        if logged:
            record[peer] = {"metrics": result.metrics, "fit_seconds": result.fit_seconds,
                            "validation_ndcg": result.validation_ndcg, "settings": result.settings,
                            "extra": result.extra, "difference": difference, "run_id": run_id}
        say(f"  {peer}: test NDCG@10 {result.metrics[NDCG]:.4f}, HR@10 {result.metrics['full_hit_rate_at_10']:.4f}"
            f", fit {result.fit_seconds:.1f} s")
    return record

