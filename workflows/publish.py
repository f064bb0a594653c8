"""Publishing a finished training, whoever launched it (train job, Tune sweep).

1. Choose the re-ranking (candidates, blend weights) on the validation slice with the model and
   retriever fitted without it (the search phase's best weights, a retriever on train). The choice is
   an artifact of its own (`reranking.json`, in the run and in the model's folder), never written into
   the config.
2. Build the served recommender: the final (refit) model, the retriever refit on train + validation.
3. Evaluate it on the test split next to the baselines (every registered retriever's included), full ranking first,
   and the paper's sampled protocol; log metrics, plots and the model; register a version with a
   description and tags that say what it is; compare it with the champion (paired bootstrap).

Whether the version becomes champion is `workflows.champion.gate`'s decision.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np

from ncf import plots
from ncf.config import Config, EvaluationConfig
from ncf.data import MovieLens
from ncf.evaluation import (
    DECK_REPORTED,
    Ranker,
    evaluate,
    evaluate_per_user,
    fitted_baselines,
    format_table,
    full_ranking_against,
    gathered,
    sampled_metrics,
    seen_in_training,
)
from ncf.files import write_atomically
from ncf.integrations import mlflow_tracking
from ncf.metrics import paired_bootstrap
from ncf.model import NCF
from ncf.ranking import Reranking, fit_retriever, top_k
from ncf.recommender import RERANKING, ModelAlone, Recommender
from ncf.reranking_search import choose_reranking
from ncf.training.checkpoints import load_checkpoint, model_from_checkpoint
from ncf.training.state import build_model
from ncf.user_ratings import SeenItems

SERVED, MODEL_ALONE = "ncf", "ncf model alone"
HEADLINE = ("full_ndcg_at_10", "full_hit_rate_at_10", "full_recall_at_10", "full_coverage")


@dataclass
class RunSummary:
    run_id: str
    metrics: dict[str, dict[str, float]]  # "ncf" (as served), the model alone and each baseline -> metric -> value
    validation: dict[str, float]  # the run's validation figures (the champion gate reads one of them)
    model_version: str  # "" when not registered
    model_name: str = ""
    comparison: dict[str, str] = field(default_factory=dict)  # against the champion, on test

    @property
    def best_val_rmse(self) -> float:
        return self.validation.get("best_val_rmse", float("nan"))


def log_data_tags(data: MovieLens) -> None:
    mlflow.set_tags({f"data.sha256.{name}": digest for name, digest in data.checksums.items()})
    mlflow.set_tags({f"data.split.{k}": v for k, v in data.splits.sizes().items()})


def log_plots(model: NCF, history: list[dict], data: MovieLens) -> None:
    test = data.splits.test
    out = ModelAlone(model).explain(test.user, test.movie)
    figures = {"learning_curves": plots.learning_curves(history),
               "movie_embeddings": plots.movie_embedding_map(model, data),
               "attention_weights": plots.attention_histogram(out["user_weight"])}
    if "rating" in model.heads:
        figures["ratings_predicted_vs_true"] = plots.rating_distributions(test.rating, out["rating"])
    for name, figure in figures.items():
        mlflow.log_figure(figure, f"plots/{name}.png")
        plots.plt.close(figure)


def choose_on_validation(config: Config, data: MovieLens, search_model: NCF) -> tuple[Reranking, dict[str, float]]:
    """The re-ranking chosen on validation (`config.retrieval`'s unless `retrieval.choose_on_validation`), and
    the served ranking's validation figures.

    `search_model` and the retriever fitted here have seen train only. The grid's figures go to
    the run as `validation/reranking_grid.json`.
    """
    train, validation = data.splits.train, data.splits.validation
    seen = SeenItems(train.user, train.movie, data.n_users)
    retriever = fit_retriever(config.retrieval, train, data.n_users, data.n_movies, config.train.seed)
    if retriever is not None and config.retrieval.choose_on_validation:
        reranking, metrics, grid = choose_reranking(search_model, retriever, seen, validation, data.n_movies,
                                                    config.retrieval, evaluation=config.evaluation)
        mlflow.log_text(json.dumps(grid, indent=1), "validation/reranking_grid.json")
        print(f"re-ranking chosen on validation: {reranking.n_candidates} candidates, weights {reranking.weights} "
              f"(validation full NDCG@10 {metrics['full_ndcg_at_10']:.4f})", flush=True)
    else:
        reranking = Reranking.from_config(config.retrieval)
        metrics, _ = full_ranking_against(
            lambda users, s, k: top_k(search_model, retriever, reranking, users, s, k)[0], seen, validation,
            data.n_movies, evaluation=config.evaluation)
    return reranking, {f"val_{name}": value for name, value in metrics.items()}


def _best_epoch_figures(history: list[dict], best_epoch: int) -> dict[str, float]:
    """`best_val_rmse` and `best_val_mae` at the chosen epoch, for models with a rating head."""
    at_best = next((m for m in history if int(m["epoch"]) == best_epoch and "val_rmse" in m), None)
    return {} if at_best is None else {"best_val_rmse": at_best["val_rmse"], "best_val_mae": at_best["val_mae"]}


def served_ranker(recommender: Recommender, evaluation: EvaluationConfig) -> Ranker:
    """The served recommender's test ranking: in this process, or by a pool of Ray Data actors
    (`evaluation.runner: ray_data`) with the same figures."""
    if evaluation.runner == "ray_data":
        from ncf.integrations.ray_data import actor_pool_ranker  # Ray Data only when asked for

        return actor_pool_ranker(recommender, evaluation)
    return recommender.rank


def evaluate_all(recommender: Recommender, model: NCF, config: Config, data: MovieLens) -> tuple[
        dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Test metrics of the served recommender, the model alone and the baselines (sampled protocol
    included), and the served recommender's per-user test figures (for paired comparisons). Full ranking
    ranks `evaluation`'s users; the served recommender's ranking runs where `evaluation.runner` says."""
    evaluation = config.evaluation
    served, per_user = evaluate_per_user(recommender, data, evaluation=evaluation,
                                         rank=served_ranker(recommender, evaluation))
    if "rating" not in model.heads:  # its "predicted rating" is its strength rescaled: no rating error to report
        served = {name: value for name, value in served.items() if name not in ("rmse", "mae")}
    served |= sampled_metrics(recommender.score_pairs, data, sample=evaluation)
    results = {SERVED: served}
    if recommender.candidates is not None:  # without a retriever the served ranking is the model alone
        alone = ModelAlone(model)
        results[MODEL_ALONE] = {k: v for k, v in evaluate(alone, data, evaluation=evaluation).items()
                                if k.startswith("full_")}
        results[MODEL_ALONE] |= sampled_metrics(alone.score_pairs, data, sample=evaluation)
    for baseline in fitted_baselines(data, config.retrieval):
        results[baseline.name] = evaluate(baseline, data, evaluation=evaluation)
        if baseline.score is not None:
            results[baseline.name] |= sampled_metrics(gathered(baseline.score), data, sample=evaluation)
    return results, per_user


def describe(config: Config, reranking: Reranking, data: MovieLens, validation: dict[str, float],
             test: dict[str, float]) -> str:
    """The registered version's description: what it is and how good, without opening its run."""
    retriever = config.retrieval.retriever
    stage = ("no retrieval stage" if retriever == "none" else
             f"{retriever.upper()} retrieval, top {reranking.n_candidates} re-ranked")
    rating = f", RMSE {test['rmse']:.4f}" if "rmse" in test else ""
    return (f"{config.preset} preset: {config.model.architecture} ({'attention' if config.model.attention else 'no'}"
            f" gate), objective {config.model.objective}, {stage}. Data {config.data.name} "
            f"({data.splits.sizes()['train'] + data.splits.sizes()['validation']} training ratings). "
            f"Validation full NDCG@10 {validation['val_full_ndcg_at_10']:.4f}. Test: full NDCG@10 "
            f"{test['full_ndcg_at_10']:.4f}, HR@10 {test['full_hit_rate_at_10']:.4f}, Recall@10 "
            f"{test['full_recall_at_10']:.4f}, coverage {test['full_coverage']:.4f}{rating}.")


def compare_with_champion(config: Config, data: MovieLens, per_user: dict[str, np.ndarray]) -> dict[str, str]:
    """Paired bootstrap over test users of the candidate's full NDCG@10 minus the champion's, when the
    champion was trained on the same data and split (reported only: the gate decides on validation)."""
    name = mlflow_tracking.model_name(config)
    champion = mlflow_tracking.champion_version(name)
    if champion is None or config.registry.bootstrap_resamples == 0:
        return {}
    run = mlflow.get_run(champion.run_id) if champion.run_id else None
    ours = mlflow.get_run(mlflow.active_run().info.run_id)
    same_data = run is not None and all(run.data.tags.get(key) == value for key, value in ours.data.tags.items()
                                        if key.startswith("data."))
    if not same_data:
        return {"champion.test_comparison": f"version {champion.version} was trained on other data: not compared"}
    with tempfile.TemporaryDirectory(prefix="ncf-champion-") as tmp:
        incumbent = mlflow_tracking.load_recommender(f"models:/{name}/{champion.version}", tmp)
    # The same users as the candidate's figures (same split, evaluation.users and seed): a paired comparison.
    _, theirs = full_ranking_against(incumbent.rank, seen_in_training(data), data.splits.test, data.n_movies,
                                     evaluation=config.evaluation)
    interval = paired_bootstrap(per_user["full_ndcg_at_10"], theirs["full_ndcg_at_10"],
                                n_resamples=config.registry.bootstrap_resamples)
    mlflow.log_metrics({"test_full_ndcg_at_10_minus_champion": interval.difference,
                        "test_full_ndcg_at_10_minus_champion_low": interval.low,
                        "test_full_ndcg_at_10_minus_champion_high": interval.high})
    print(f"test full NDCG@10 minus champion version {champion.version}: {interval.difference:+.4f} "
          f"[{interval.low:+.4f}, {interval.high:+.4f}] (95% paired bootstrap over users)", flush=True)
    return {"champion.test_comparison": f"full NDCG@10 minus version {champion.version}: {interval.difference:+.4f} "
                                        f"[{interval.low:+.4f}, {interval.high:+.4f}]"}


def finish_run(config: Config, data: MovieLens, checkpoint: Path, register: bool = True) -> RunSummary:
    """Choose the re-ranking, evaluate the checkpoint's final recommender and record everything in the active run."""
    saved = load_checkpoint(checkpoint)
    state = saved["state"]
    model = model_from_checkpoint(checkpoint, config, data)
    search_model = build_model(config, data)
    search_model.load_state_dict(state["best_weights"] or saved["model"])
    reranking, validation = choose_on_validation(config, data, search_model.eval())
    monitor = config.train.monitor
    validation |= {"best_epoch": state["best_epoch"], f"best_{monitor}": state["best_value"]}
    validation |= _best_epoch_figures(state["history"], state["best_epoch"])
    # After every epoch's figures: the latest value of each name is the run's answer.
    mlflow.log_metrics(validation, step=int(state["epoch"]) + 1)

    retriever = fit_retriever(config.retrieval, data.splits.train_and_validation(), data.n_users, data.n_movies,
                              config.train.seed)
    recommender = Recommender.from_training(model, config, data, retriever, reranking)
    mlflow.log_dict(dataclasses.asdict(reranking), RERANKING)  # also in the model's folder, which the pyfunc loads
    print("evaluating on the test split ...", flush=True)
    results, per_user = evaluate_all(recommender, model, config, data)
    mlflow_tracking.log_test_metrics(results, primary=SERVED)
    log_plots(model, state["history"], data)
    comparison = compare_with_champion(config, data, per_user) if register else {}
    mlflow.set_tags(comparison)
    with tempfile.TemporaryDirectory(prefix="ncf-recommender-") as tmp:
        folder = recommender.save(Path(tmp))
        info = mlflow_tracking.log_recommender(folder, config, register=register)
    version = str(info.registered_model_version) if register else ""
    if register:
        description = describe(config, reranking, data, validation, results[SERVED])
        mlflow_tracking.describe_version(config, version, description, {
            "preset": config.preset, "objective": config.model.objective, "architecture": config.model.architecture,
            "retriever": config.retrieval.retriever, "dataset": config.data.name,
            **{f"data.sha256.{name}": digest for name, digest in data.checksums.items()}})
    return RunSummary(mlflow.active_run().info.run_id, results, validation, version,
                      mlflow_tracking.model_name(config), comparison)


def write_report(summary: RunSummary, data: MovieLens, path: Path) -> None:
    """Print the metric table (with the deck's reported figures) and write it as JSON, atomically: a full disk
    or a read-only folder leaves no half-written file and raises a WriteError naming `path`."""
    print(format_table(summary.metrics | {"deck (reported)": DECK_REPORTED}))
    write_atomically(path, json.dumps({
        "split": data.splits.sizes(), "models": summary.metrics, "validation": summary.validation,
        "reference": {"deck_reported": DECK_REPORTED}, "comparison_with_champion": summary.comparison,
        "mlflow": {"run_id": summary.run_id, "model": summary.model_name, "version": summary.model_version},
    }, indent=2, default=float), "report")
    print(f"wrote {path}")


def headline(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {metrics[name]:.4f}" for name in HEADLINE if name in metrics)

