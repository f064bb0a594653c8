"""The validation figures of every search epoch. The launcher builds the `Validation` and hands it to the loop
(`ncf.training.loop.train_loop`): under Ray Data a worker builds it from splits it then lets go."""

from __future__ import annotations

import math

import torch

from ncf.config import Config
from ncf.data import MovieLens
from ncf.evaluation import full_ranking_against, relevant_targets
from ncf.metrics import K
from ncf.model import NCF, forward_batched
from ncf.ranking import CandidateRetriever, Reranking, Retrieved, fit_retriever, top_k
from ncf.training.reporting import same_on_all_ranks
from ncf.user_ratings import SeenItems


class Validation:
    """The validation figures of every epoch: rating error (models with a rating head) and the
    full-catalogue ranking of the validation slice by what would be served (`ncf.ranking.top_k`,
    with a retriever fitted on train alone) over `evaluation`'s users, `val_full_users` of them. Computed on
    rank 0 and shared with every rank."""

    def __init__(self, config: Config, data: MovieLens, rank: int, retriever: CandidateRetriever | None = None):
        """Rank 0 keeps the validation slice, the movies each user has seen in train and the retriever fitted
        on train (or `retriever`, one already fitted so with `config.retrieval`), never `data` itself: a caller may
        let the train split go once this is built."""
        self.config, self.rank = config, rank
        if rank != 0:
            return
        self.target, self.n_movies = data.splits.validation, data.n_movies
        self.users, self.movies, self.ratings = self.target.tensors()
        train = data.splits.train
        self.seen = SeenItems(train.user, train.movie, data.n_users)
        self.retriever = retriever or fit_retriever(config.retrieval, train, data.n_users, data.n_movies,
                                                    config.train.seed)
        self.reranking = Reranking.from_config(config.retrieval)
        # The users every epoch ranks, retrieved for once (the retriever does not change between epochs).
        self.retrieved = (Retrieved(self.retriever, relevant_targets(self.target, config.evaluation)[0], self.seen,
                                    self.reranking.width(K)) if self.retriever else None)

    def __call__(self, model: NCF) -> dict[str, float]:
        names = ["val_full_ndcg_at_10", "val_full_hit_rate_at_10", "val_full_users"]
        if "rating" in model.heads:
            names = ["val_loss", "val_mae"] + names
        values = [0.0] * len(names)
        if self.rank == 0:
            figures = {}
            if "rating" in model.heads:
                predicted = forward_batched(model, self.users, self.movies).rating
                figures["val_loss"] = float(torch.mean((predicted - self.ratings) ** 2))
                figures["val_mae"] = float(torch.mean(torch.abs(predicted - self.ratings)))
            model.eval()
            ranking, _ = full_ranking_against(
                lambda users, seen, k: top_k(model, self.retriever, self.reranking, users, seen, k,
                                             retrieved=self.retrieved)[0],
                self.seen, self.target, self.n_movies, evaluation=self.config.evaluation)
            figures |= {f"val_{name}": ranking[name] for name in ("full_ndcg_at_10", "full_hit_rate_at_10",
                                                                  "full_users")}
            values = [figures[name] for name in names]
        metrics = dict(zip(names, same_on_all_ranks(values), strict=True))
        if "val_loss" in metrics:
            metrics["val_rmse"] = math.sqrt(metrics["val_loss"])
        return metrics
