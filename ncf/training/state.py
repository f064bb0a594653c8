"""What a training run is at (`Phase`, `TrainState`: what a checkpoint saves) and what it produces."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from ncf.config import Config
from ncf.data import MovieLens
from ncf.model import NCF


class Phase(IntEnum):
    """Search: early stopping on validation. Refit: the best epoch count again on train + validation.
    Stored as its number in checkpoints and in every epoch's metrics (`phase`)."""

    SEARCH = 0
    REFIT = 1


@dataclass
class TrainState:
    """Everything a restarted run needs to continue exactly where it stopped."""

    phase: Phase = Phase.SEARCH
    epoch: int = 0
    refit_epochs: int = 0
    resumed: int = 0  # how many times the run continued from a checkpoint after a failure
    best_value: float = math.nan  # of train.monitor, at best_epoch
    best_epoch: int = 0
    stale_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None


@dataclass
class TrainResult:
    model: NCF
    best_epoch: int
    best_value: float  # of train.monitor
    history: list[dict[str, float]]


def build_model(config: Config, data: MovieLens) -> NCF:
    """The untrained model `config` describes, sized for `data`, reading the train split's ratings as its users'
    histories (a history model): what training starts from and a checkpoint's weights load into."""
    genres = torch.from_numpy(data.genres) if config.model.use_genres else None
    model = NCF(data.n_users, data.n_movies, config.model, genres)
    model.remember(data.splits.train)
    return model


def final_weights(saved: dict) -> dict[str, torch.Tensor]:
    """The run's answer from a checkpoint's contents: the refit weights once refitting started, else the best
    by validation."""
    state = saved["state"]
    if state["phase"] == Phase.REFIT or state["best_weights"] is None:
        return saved["model"]
    return state["best_weights"]
