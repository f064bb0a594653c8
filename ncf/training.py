"""One training loop for every launcher: in-process, Ray Train worker, Ray Tune trial.

The loop only talks to a `Reporter`: it asks it for the device, the rank, a
checkpoint to resume from, and hands it each epoch's metrics (and, on rank 0, a
checkpoint folder). Launchers differ only in the reporter they pass: `LocalReporter`
here (`fit_in_process`), the Ray ones in `ncf.integrations.ray_train`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ncf.config import Config
from ncf.data import MovieLens, epoch_batches
from ncf.model import NCF, forward_batched

CHECKPOINT_FILE = "checkpoint.pt"


class Reporter(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model: nn.Module) -> nn.Module:
        """Wrap the model for this launcher (DDP under Ray Train)."""

    def restore(self) -> Path | None:
        """A checkpoint folder to resume from, if the run is being restarted."""

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        """Publish one epoch; every rank calls it, only rank 0 passes a checkpoint."""


class LocalReporter:
    """In-process runs: prints progress, keeps the latest checkpoint in a folder."""

    rank, world_size = 0, 1

    def __init__(self, checkpoint_dir: Path | None = None, resume: bool = False, device: str = "cpu",
                 verbose: bool = True, on_epoch: Callable[[dict[str, float]], None] | None = None):
        self.device = torch.device(device)
        self.on_epoch = on_epoch
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resume = resume
        self.verbose = verbose
        self.history: list[dict[str, float]] = []

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def restore(self) -> Path | None:
        if self.resume and self.checkpoint_dir and (self.checkpoint_dir / CHECKPOINT_FILE).exists():
            return self.checkpoint_dir
        return None

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        self.history.append(metrics)
        if self.verbose:
            print(format_epoch(metrics), flush=True)
        if self.on_epoch:
            self.on_epoch(metrics)
        if checkpoint and self.checkpoint_dir:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkpoint / CHECKPOINT_FILE, self.checkpoint_dir / CHECKPOINT_FILE)


def format_epoch(m: dict[str, float]) -> str:
    """One progress line; refit epochs have no validation figures (validation is in their data)."""
    validation = (f"val_rmse {m['val_rmse']:.4f}  val_mae {m['val_mae']:.4f}" if "val_rmse" in m
                  else "refit on train + validation")
    return (f"epoch {int(m['epoch']):3d}  train_loss {m['train_loss']:.4f}  {validation}  lr {m['lr']:.2e}  "
            f"{m['epoch_seconds']:.1f}s" + ("  *" if m.get("improved") else ""))


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
    best_val_rmse: float = math.inf
    best_epoch: int = 0
    stale_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None


@dataclass
class TrainResult:
    model: NCF
    best_epoch: int
    best_val_rmse: float
    history: list[dict[str, float]]


def build_model(config: Config, data: MovieLens) -> NCF:
    genres = torch.from_numpy(data.genres) if config.model.use_genres else None
    return NCF(data.n_users, data.n_movies, config.model, genres)


def save_checkpoint(folder: Path, model: NCF, optimizer, scheduler, state: TrainState) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "state": state.__dict__ | {"phase": int(state.phase)}}, folder / CHECKPOINT_FILE)


def load_checkpoint(folder: Path) -> dict:
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def final_weights(saved: dict) -> dict[str, torch.Tensor]:
    """The run's answer: the refit weights once refitting started, else the best by validation."""
    state = saved["state"]
    if state["phase"] == Phase.REFIT or state["best_weights"] is None:
        return saved["model"]
    return state["best_weights"]


def model_from_checkpoint(folder: Path, config: Config, data: MovieLens) -> NCF:
    model = build_model(config, data)
    model.load_state_dict(final_weights(load_checkpoint(folder)))
    return model.eval()


def _same_on_all_ranks(values: list[float]) -> list[float]:
    """Rank 0's values everywhere, so every rank takes the same early-stopping decision."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def _train_epoch(wrapped: nn.Module, optimizer, tensors, cfg, epoch: int, reporter: Reporter) -> float:
    """One pass over this rank's shard; returns the mean training loss."""
    device = reporter.device
    use_bf16 = cfg.mixed_precision and device.type == "cuda"
    wrapped.train()
    loss_sum, n_seen = 0.0, 0
    for users, movies, ratings in epoch_batches(tensors, cfg.batch_size, epoch=epoch, seed=cfg.seed,
                                                rank=reporter.rank, world_size=reporter.world_size):
        users, movies, ratings = users.to(device), movies.to(device), ratings.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
            predicted = wrapped(users, movies).rating
        loss = nn.functional.mse_loss(predicted.float(), ratings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(users)
        n_seen += len(users)
    return loss_sum / max(n_seen, 1)


def _report(reporter: Reporter, metrics: dict[str, float], model, optimizer, scheduler, state: TrainState) -> None:
    state.history.append(metrics)
    with tempfile.TemporaryDirectory(prefix="ncf-ckpt-") as tmp:
        checkpoint = None
        if reporter.rank == 0:
            checkpoint = Path(tmp)
            save_checkpoint(checkpoint, model, optimizer, scheduler, state)
        reporter.report(metrics, checkpoint)


def train_loop(config: Config, data: MovieLens, reporter: Reporter) -> TrainResult:
    """Early-stop on validation RMSE, then (train.refit) retrain on train + validation.

    The refit phase repeats the best epoch count with the learning rates the search
    phase used, so the final model also learns from each user's most recent ratings,
    the ones closest in time to the test split.
    """
    cfg = config.train
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(config, data).to(reporter.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_plateau_factor, patience=cfg.lr_plateau_patience)
    state = TrainState()
    resume_from = reporter.restore()
    if resume_from is not None:
        saved = load_checkpoint(resume_from)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**(saved["state"] | {"phase": Phase(saved["state"]["phase"])}))
        state.resumed += 1
        print(f"resuming at epoch {state.epoch + 1} ({state.phase.name.lower()} phase, "
              f"best val_rmse {state.best_val_rmse:.4f})", flush=True)
    wrapped = reporter.prepare(model)
    val_users, val_movies, val_ratings = data.splits.validation.tensors()

    while state.phase == Phase.SEARCH and state.epoch < cfg.max_epochs and state.stale_epochs < cfg.patience:
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss = _train_epoch(wrapped, optimizer, data.splits.train.tensors(), cfg, state.epoch, reporter)
        predicted = forward_batched(model, val_users, val_movies).rating
        val_mse, val_mae = _same_on_all_ranks([float(torch.mean((predicted - val_ratings) ** 2)),
                                              float(torch.mean(torch.abs(predicted - val_ratings)))])
        scheduler.step(val_mse)
        val_rmse = math.sqrt(val_mse)
        improved = val_rmse < state.best_val_rmse - 1e-5
        if improved:
            state.best_val_rmse, state.best_epoch, state.stale_epochs = val_rmse, state.epoch + 1, 0
            state.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state.stale_epochs += 1
        state.epoch += 1
        _report(reporter, {
            "epoch": state.epoch, "phase": float(Phase.SEARCH), "train_loss": train_loss,
            "train_rmse": math.sqrt(train_loss),
            "val_loss": val_mse, "val_rmse": val_rmse, "val_mae": val_mae, "best_val_rmse": state.best_val_rmse,
            "lr": lr, "epoch_seconds": time.perf_counter() - started, "improved": float(improved),
        }, model, optimizer, scheduler, state)

    if cfg.refit and state.phase == Phase.SEARCH and state.best_epoch > 0:
        state.phase = Phase.REFIT
        torch.manual_seed(cfg.seed)
        model.reset_parameters()  # in place, identically on every rank: a DDP wrapper stays valid
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        print(f"refitting on train + validation for {state.best_epoch} epoch(s)", flush=True)
    if state.phase == Phase.REFIT:
        search_lrs = [m["lr"] for m in state.history if m["phase"] == Phase.SEARCH]
        all_train = data.splits.train_and_validation().tensors()
        while state.refit_epochs < state.best_epoch:
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = search_lrs[state.refit_epochs]
            train_loss = _train_epoch(wrapped, optimizer, all_train, cfg, state.refit_epochs, reporter)
            state.refit_epochs += 1
            state.epoch += 1
            _report(reporter, {
                "epoch": state.epoch, "phase": float(Phase.REFIT), "train_loss": train_loss,
                "train_rmse": math.sqrt(train_loss),
                "best_val_rmse": state.best_val_rmse, "lr": search_lrs[state.refit_epochs - 1],
                "epoch_seconds": time.perf_counter() - started,
            }, model, optimizer, scheduler, state)

    final = copy.deepcopy(model).cpu()
    final.load_state_dict(final_weights({"model": final.state_dict(), "state": state.__dict__}))
    return TrainResult(final.eval(), state.best_epoch, state.best_val_rmse, state.history)


def fit_in_process(config: Config, data: MovieLens, checkpoint_dir: Path, resume: bool = False,
                   on_epoch: Callable[[dict[str, float]], None] | None = None) -> Path:
    """Train in this process (the `local` launcher); `resume` continues from the checkpoint in `checkpoint_dir`."""
    device = "cuda" if config.train.use_gpu else "cpu"
    train_loop(config, data, LocalReporter(checkpoint_dir, resume=resume, device=device, on_epoch=on_epoch))
    return checkpoint_dir
