"""Figures logged with every run: learning curves, rating fit, embeddings, attention."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from ncf.data import MovieLens  # noqa: E402
from ncf.model import NCF  # noqa: E402


def learning_curves(history: list[dict[str, float]]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    search = [h for h in history if h["phase"] == 0.0]
    refit = [h for h in history if h["phase"] == 1.0]
    ax.plot([h["epoch"] for h in search], [h["train_rmse"] for h in search], "o-", label="train RMSE")
    ax.plot([h["epoch"] for h in search], [h["val_rmse"] for h in search], "o-", label="validation RMSE")
    if refit:
        ax.plot([h["epoch"] for h in refit], [h["train_rmse"] for h in refit], "s--",
                label="refit on train + validation (train RMSE)")
    ax.set(xlabel="epoch", ylabel="RMSE", title="Learning curves")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
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
