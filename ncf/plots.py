"""Figures logged to MLflow: learning curves, rating fit, embeddings, attention, a sweep's trials."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import math  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from ncf.config import Config  # noqa: E402
from ncf.data import MovieLens  # noqa: E402
from ncf.model import NCF  # noqa: E402
from ncf.training.state import Phase


def learning_curves(history: list[dict[str, float]]) -> plt.Figure:
    """Training loss (train RMSE for models with a rating head) and validation RMSE on the left,
    the served ranking's validation NDCG@10 on the right."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    search = [h for h in history if h["phase"] == Phase.SEARCH]
    refit = [h for h in history if h["phase"] == Phase.REFIT]
    rating = bool(search) and "train_rmse" in search[0]
    train_key, label = ("train_rmse", "RMSE") if rating else ("train_loss", "loss")
    left.plot([h["epoch"] for h in search], [h[train_key] for h in search], "o-", label=f"train {label}")
    if rating and "val_rmse" in search[0]:
        left.plot([h["epoch"] for h in search], [h["val_rmse"] for h in search], "o-", label="validation RMSE")
    if refit:
        left.plot([h["epoch"] for h in refit], [h[train_key] for h in refit], "s--",
                  label=f"refit on train + validation (train {label})")
    left.set(xlabel="epoch", ylabel=label, title="Learning curves")
    left.legend(loc="best")
    left.grid(alpha=0.3)
    right.plot([h["epoch"] for h in search], [h.get("val_full_ndcg_at_10", np.nan) for h in search], "o-",
               color="tab:green", label="served ranking (validation)")
    right.set(xlabel="epoch", ylabel="full-ranking NDCG@10", title="Validation ranking quality")
    right.legend(loc="best")
    right.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def rating_distributions(true: np.ndarray, predicted: np.ndarray) -> plt.Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.arange(0.25, 5.5, 0.25)
    left.hist(true, bins=bins, alpha=0.6, label="true")
    left.hist(predicted, bins=bins, alpha=0.6, label="predicted")
    left.set(xlabel="rating", ylabel="test ratings", title="Rating distributions (test)")
    left.legend()
    steps = np.unique(true)
    right.boxplot([predicted[true == s] for s in steps], positions=steps, widths=0.3)
    right.plot([0.5, 5], [0.5, 5], "k:", lw=1)
    right.set(xlabel="true rating", ylabel="predicted rating", title="Predicted vs true (test)")
    fig.tight_layout()
    return fig


@torch.no_grad()
def movie_embedding_map(model: NCF, data: MovieLens, n_movies: int = 1500) -> plt.Figure:
    """PCA of the most-rated movies' representations, coloured by their first genre."""
    counts = np.bincount(data.splits.train.movie, minlength=data.n_movies)
    movies = np.argsort(-counts, kind="stable")[:n_movies]
    vectors = model.movie_vectors(torch.as_tensor(movies)).numpy()
    points = PCA(n_components=2, random_state=0).fit_transform(vectors)
    first_genre = np.array([g.split("|")[0] for g in data.movies["genres"].to_numpy()[movies]])
    fig, ax = plt.subplots(figsize=(8, 6))
    for genre in sorted(set(first_genre)):
        mask = first_genre == genre
        ax.scatter(points[mask, 0], points[mask, 1], s=8, alpha=0.7, label=genre)
    ax.set(title=f"Movie embeddings, PCA of the {n_movies} most-rated movies", xlabel="PC 1", ylabel="PC 2")
    ax.legend(fontsize=7, markerscale=2, ncol=2, loc="best")
    fig.tight_layout()
    return fig


def attention_histogram(user_weight: np.ndarray) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(user_weight, bins=50, range=(0, 1), alpha=0.8, label="user preferences")
    ax.hist(1 - user_weight, bins=50, range=(0, 1), alpha=0.5, label="movie characteristics")
    ax.set(xlabel="attention weight", ylabel="test pairs", title="Attention weights (sum to 1 per pair)")
    ax.legend()
    fig.tight_layout()
    return fig


def trials_plot(board: pd.DataFrame, config: Config, metric: str) -> plt.Figure:
    """A sweep's trials: `metric` against each searched value; colour: epochs each trial ran."""
    keys = config.tune.searched_keys()
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    done = board.dropna(subset=[metric])
    for ax, key in zip(axes.flat, keys, strict=False):
        section, name = key.split(".", 1)  # a retriever's key is nested: retrieval.history.dimension
        spec = config.tune.space[section][name]
        values = done[key]
        if spec.choice is not None:
            labels = [str(c) for c in spec.choice]
            x = values.map(lambda v, labels=labels: labels.index(str(v)))
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            x = values.astype(float)
            if spec.loguniform is not None:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        points = ax.scatter(x, done[metric], c=done["epochs"], cmap="viridis", vmin=1,
                            vmax=config.tune.max_epochs, s=28, edgecolors="k", linewidths=0.3)
        ax.scatter(x.iloc[:1], done[metric].iloc[:1], marker="*", s=220, c="crimson", label="best")
        ax.set(xlabel=key, ylabel=metric if ax in axes[:, 0] else None)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(done):
        fig.colorbar(points, ax=axes, label="epochs run (ASHA / early stopping)", shrink=0.8)
        axes.flat[0].legend(loc="upper right")
    fig.suptitle("Trials against their hyperparameters")
    return fig
