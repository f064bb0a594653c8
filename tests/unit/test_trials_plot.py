"""The sweep's plot of trials against each searched value, with a retriever's nested keys (a space that searches the
history retriever's settings names `retrieval.history.dimension`, ...)."""

from __future__ import annotations

import pandas as pd
import pytest

from ncf import plots
from ncf.config import load_config

pytestmark = pytest.mark.unit


def test_the_trials_plot_draws_every_searched_value_nested_keys_included():
    space = ("tune.space={retrieval: {history.dimension: {choice: [256, 600, 1000]},"
             " history.epochs: {choice: [50, 100, 150]}, history.learning_rate: {loguniform: [1.0e-3, 1.0e-2]},"
             " history.item_dropout: {uniform: [0.2, 0.7]}, history.weight_decay: {choice: [0.0, 1.0e-6, 1.0e-5]},"
             " recency_half_life: {choice: [25, 50, 200]}}}")
    config = load_config(["train.monitor=val_full_ndcg_at_10", space], preset="history")
    keys = config.tune.searched_keys()
    assert "retrieval.history.dimension" in keys
    board = pd.DataFrame({"retrieval.history.dimension": [256, 600, 1000], "retrieval.history.epochs": [50, 100, 150],
                          "retrieval.history.learning_rate": [1e-3, 3e-3, 1e-2],
                          "retrieval.history.item_dropout": [0.2, 0.4, 0.6],
                          "retrieval.history.weight_decay": [0.0, 1e-6, 1e-5],
                          "retrieval.recency_half_life": [25, 50, 200],
                          "best_val_full_ndcg_at_10": [0.137, 0.135, 0.131], "epochs": [3, 1, 9]})
    figure = plots.trials_plot(board, config, "best_val_full_ndcg_at_10")
    drawn = {ax.get_xlabel(): len(ax.collections[0].get_offsets()) for ax in figure.axes if ax.get_xlabel() in keys}
    assert drawn == dict.fromkeys(keys, 3)  # one panel per searched value, every trial in it
    plots.plt.close(figure)
