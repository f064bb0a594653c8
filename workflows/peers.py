"""Peers side by side (`make peers`), the measurements: most-popular, EASE, ALS, item-kNN and the history model on
one split (`data.split.protocol`: seed or temporal), scored with the project's own full-ranking code. SASRec:
`workflows.peers_sasrec`; the presets and the MLflow experiment `peers`: `workflows.peers_runs`.

Protocol (as `make bench-retrieval`'s): every movie a user has not rated is ranked; relevant = a held-out rating of
at least `evaluation.relevant_rating`. A peer's settings are chosen on the validation slice (fit on train, ranked
against validation), refit on train + validation and scored once on test. The retrievers' grids are small: around
the settings `make bench-retrieval` chose (the recommender preset's retrieval section: ratings >= 4, profiles
weighted by recency and rating; a profile a retriever cannot score gets the most rated movies, as served).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ncf.baselines import MostPopular
from ncf.config import Config, RetrievalConfig, load_config
from ncf.data import MovieLens
from ncf.prepared import load_movielens
from ncf.ranking import fit_retriever
from workflows.retrieval_bench import NDCG, Slice, say, slices

REFERENCE = "ease"  # every peer's NDCG@10 is compared with this one's, user by user
PRESETS = ("deck", "recommender")
# The retrievers' inputs and profiles: the recommender preset's retrieval section (chosen by make bench-retrieval);
# the history model's: the history preset's (chosen by make bench-history, which searches its own grid).
RETRIEVER_PRESETS = {"history": "history"}
DEFAULT_RETRIEVER_PRESET = "recommender"
# Each retriever's validation grid: overrides of that retrieval section.
RETRIEVER_GRIDS: dict[str, list[dict[str, object]]] = {
    "ease": [{"retrieval.ease.regularization": lam} for lam in (100.0, 250.0, 500.0)],
    "als": [{"retrieval.als.factors": factors} for factors in (32, 64, 128)],
    "itemknn": [{"retrieval.itemknn.neighbours": n} for n in (50, 100, 200)],
    "history": [{}],
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


# ----------------------------------------------------------------------------- the peers


def most_popular(p: Protocol) -> PeerResult:
    started = time.perf_counter()
    model = MostPopular().fit(p.test.fit_on, p.data.n_users, p.data.n_movies)
    seconds = time.perf_counter() - started
    metrics, ndcg = p.test.evaluate(model.score)
    return PeerResult("most_popular", metrics, ndcg, seconds, {"order": "number of ratings in train + validation"})


def retriever_config(name: str, setting: dict[str, object], overrides: list[str]) -> RetrievalConfig:
    """The retrieval section of `name`'s preset (`RETRIEVER_PRESETS`) with retriever `name`, `setting` and no
    sequence signal."""
    setting = {"retrieval.retriever": name, "retrieval.sequence.weight": 0.0, **setting}
    return load_config([*overrides, *(f"{key}={value}" for key, value in setting.items())],
                       preset=RETRIEVER_PRESETS.get(name, DEFAULT_RETRIEVER_PRESET)).retrieval


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
