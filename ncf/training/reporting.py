"""What the loop tells its launcher, and what the ranks of a data-parallel run tell each other.

The loop only talks to a `Reporter`: it asks it for the device, the rank, a checkpoint to resume from, and
hands it each epoch's metrics (and, on rank 0, a checkpoint folder). Launchers differ only in the reporter
they pass: `LocalReporter` here (`ncf.training.loop.fit_in_process`), the Ray ones in
`ncf.integrations.ray_train`.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from ncf.training.checkpoints import load_latest_intact, rotate_in


class Reporter(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare(self, model: nn.Module) -> nn.Module:
        """Wrap the model for this launcher (DDP under Ray Train)."""

    def restore(self) -> dict | None:
        """The checkpoint to resume from, verified and loaded (`load_checkpoint`), if the run is being restarted."""

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        """Publish one epoch; every rank calls it, only rank 0 passes a checkpoint."""


class LocalReporter:
    """In-process runs: prints progress, keeps the latest checkpoint in a folder and the one before it
    in its `previous/` subfolder, which `restore` falls back to when the latest is corrupt or truncated."""

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

    def restore(self) -> dict | None:
        """The latest checkpoint if intact; else, with a warning, the previous one; else a CheckpointError."""
        if not (self.resume and self.checkpoint_dir):
            return None
        return load_latest_intact(self.checkpoint_dir)

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        self.history.append(metrics)
        if self.verbose:
            print(format_epoch(metrics), flush=True)
        if self.on_epoch:
            self.on_epoch(metrics)
        if checkpoint and self.checkpoint_dir:
            rotate_in(checkpoint, self.checkpoint_dir)


def format_epoch(m: dict[str, float]) -> str:
    """One progress line; refit epochs have no validation figures (validation is in their data)."""
    parts = [f"{name} {m[name]:.4f}" for name in ("val_rmse", "val_mae", "val_full_ndcg_at_10") if name in m]
    validation = "  ".join(parts) if parts else "refit on train + validation"
    return (f"epoch {int(m['epoch']):3d}  train_loss {m['train_loss']:.4f}  {validation}  lr {m['lr']:.2e}  "
            f"{m['epoch_seconds']:.1f}s" + ("  *" if m.get("improved") else ""))


def figures_of_every_rank(prefix: str, mine: dict[str, float], reporter: Reporter) -> dict[str, float]:
    """This rank's `mine` and every other rank's, as `<prefix>/<rank>/<name>`: an all-gather under DDP, so
    every rank calls it at the same point. Exact for integers below 2**53."""
    tensor = torch.tensor(list(mine.values()), dtype=torch.float64, device=reporter.device)  # NCCL: on the GPU
    if dist.is_available() and dist.is_initialized():
        gathered = [torch.zeros_like(tensor) for _ in range(reporter.world_size)]
        dist.all_gather(gathered, tensor)
    else:
        gathered = [tensor]
    return {f"{prefix}/{rank}/{name}": value for rank, values in enumerate(gathered)
            for name, value in zip(mine, values.tolist(), strict=True)}


def same_on_all_ranks(values: list[float]) -> list[float]:
    """Rank 0's values everywhere, so every rank takes the same early-stopping decision."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (pages of Ray's object store it has read included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker_figures(reporter: Reporter, n_samples: int) -> dict[str, float]:
    """Every rank's samples trained this epoch and peak memory so far (`worker/<rank>/...`), and the total
    `train_samples`: throughput and memory per worker, whatever the launcher and loader."""
    figures = figures_of_every_rank("worker", {"samples": n_samples, "peak_rss_gb": peak_rss_gib()}, reporter)
    return figures | {"train_samples": sum(v for k, v in figures.items() if k.endswith("/samples"))}
