"""Choosing the re-ranking (`ncf.ranking.Reranking`: how many candidates, each head's weight) on the validation
slice: a grid search over `retrieval`'s grids that re-blends candidates retrieved once."""

from __future__ import annotations

import itertools

from ncf.config import EvaluationConfig, RetrievalConfig
from ncf.data import Ratings
from ncf.evaluation import relevant_targets
from ncf.metrics import K, full_ranking_per_user, full_ranking_summary
from ncf.model import NCF
from ncf.ranking import CandidateRetriever, Reranking, model_signals, own_profiles, rerank, retrieve
from ncf.user_ratings import SeenItems


def choose_reranking(model: NCF, retriever: CandidateRetriever, seen: SeenItems, target: Ratings, n_movies: int,
                     cfg: RetrievalConfig, k: int = K, *, evaluation: EvaluationConfig) -> tuple[
                         Reranking, dict[str, float], list[dict]]:
    """The grid point of `cfg`'s grids with the best full-ranking NDCG@k against `target` (the validation
    slice; `model` and `retriever` must not have seen it) over `evaluation`'s users (`relevant_targets`), its
    metrics, and every grid point's figures.

    Candidates and head signals are computed once for the largest N; each grid point only re-blends.
    Weights of heads the model lacks are not searched. Ties keep the earlier grid point.
    """
    users, rows, movies = relevant_targets(target, evaluation)
    width = max(cfg.n_candidates_grid)
    candidates, retrieved = retrieve(retriever, own_profiles(retriever, users, seen), width)
    signals = model_signals(model)(users, candidates)
    grids = {"rating": cfg.rating_weight_grid, "interaction": cfg.interaction_weight_grid}
    heads = list(signals)
    table, best = [], None
    for n in cfg.n_candidates_grid:
        for weights in itertools.product(*(grids[h] for h in heads)):
            reranking = Reranking(n, dict(zip(heads, weights, strict=True)))
            top, _ = rerank(candidates, retrieved, signals, reranking, k)
            metrics = full_ranking_summary(full_ranking_per_user(top, rows, movies, n_movies), top, n_movies)
            table.append({"n_candidates": n, **{f"{h}_weight": w for h, w in reranking.weights.items()}, **metrics})
            if best is None or metrics[f"full_ndcg_at_{k}"] > best[1][f"full_ndcg_at_{k}"]:
                best = (reranking, metrics)
    return best[0], best[1], table
