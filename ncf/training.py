"""One training loop for every launcher: in-process, Ray Train worker, Ray Tune trial.

The loop only talks to a `Reporter`: it asks it for the device, the rank, a
checkpoint to resume from, and hands it each epoch's metrics (and, on rank 0, a
checkpoint folder). Launchers differ only in the reporter they pass: `LocalReporter`
here (`fit_in_process`), the Ray ones in `ncf.integrations.ray_train`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ncf.config import Config, TrainConfig
from ncf.data import MovieLens, Ratings, epoch_batches
from ncf.evaluation import full_ranking_against, relevant_targets
from ncf.files import atomic_path, check_writable, copy_atomically, make_folder, write_atomically
from ncf.metrics import K
from ncf.model import NCF, forward_batched
from ncf.ranking import SeenItems
from ncf.reranking import Reranking, Retrieved, fit_retriever, top_k

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "previous"  # LocalReporter's subfolder with the checkpoint before the latest


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
        latest, previous = self.checkpoint_dir, self.checkpoint_dir / PREVIOUS_CHECKPOINT
        if not (latest / CHECKPOINT_FILE).exists() and not (previous / CHECKPOINT_FILE).exists():
            return None
        try:
            return load_checkpoint(latest)
        except CheckpointError as latest_error:
            try:
                saved = load_checkpoint(previous)
            except CheckpointError as previous_error:
                raise CheckpointError(f"{latest_error}; no intact checkpoint to fall back to: {previous_error}") \
                    from latest_error
            # Set aside, so the next epoch does not keep it as "previous" over the intact one.
            for path in (latest / CHECKPOINT_FILE, checksum_path(latest)):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, path.with_name(f"{path.name}.corrupt"))
            print(f"warning: {latest_error}; resuming from the previous checkpoint {previous / CHECKPOINT_FILE} "
                  f"(the corrupt one is kept as {CHECKPOINT_FILE}.corrupt)", file=sys.stderr, flush=True)
            return saved

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        self.history.append(metrics)
        if self.verbose:
            print(format_epoch(metrics), flush=True)
        if self.on_epoch:
            self.on_epoch(metrics)
        if checkpoint and self.checkpoint_dir:
            latest, previous = self.checkpoint_dir, self.checkpoint_dir / PREVIOUS_CHECKPOINT
            if (latest / CHECKPOINT_FILE).exists():  # the latest becomes the previous one, file by file
                make_folder(previous, "checkpoint")
                for path in (latest / CHECKPOINT_FILE, checksum_path(latest)):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(path, previous / path.name)
            copy_checkpoint(checkpoint, latest)


def format_epoch(m: dict[str, float]) -> str:
    """One progress line; refit epochs have no validation figures (validation is in their data)."""
    parts = [f"{name} {m[name]:.4f}" for name in ("val_rmse", "val_mae", "val_full_ndcg_at_10") if name in m]
    validation = "  ".join(parts) if parts else "refit on train + validation"
    return (f"epoch {int(m['epoch']):3d}  train_loss {m['train_loss']:.4f}  {validation}  lr {m['lr']:.2e}  "
            f"{m['epoch_seconds']:.1f}s" + ("  *" if m.get("improved") else ""))


def lower_is_better(metric: str) -> bool:
    """Errors and losses fall as models improve; ranking figures rise."""
    return metric.endswith(("rmse", "mae", "loss"))


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
    genres = torch.from_numpy(data.genres) if config.model.use_genres else None
    return NCF(data.n_users, data.n_movies, config.model, genres)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or truncated; the message names its path."""


def checksum_path(folder: Path) -> Path:
    """The sha256 of the checkpoint file, beside it (`sha256sum -c` reads it)."""
    return Path(folder) / f"{CHECKPOINT_FILE}.sha256"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class SparseDenseAdam(torch.optim.Optimizer):
    """SparseAdam for the sparse-gradient embedding tables and Adam for the rest, as one optimizer: the
    loop steps it, the LR scheduler sets the lr of its groups (the groups of both), checkpoints save
    and restore both states.

    SparseAdam moves only the rows a batch touched (lazy Adam: an untouched row keeps its moments and
    its value). It has no weight decay: here the L2 term is added to the touched rows' gradients, as
    Adam adds it to every row's.
    """

    def __init__(self, dense: list[nn.Parameter], sparse: list[nn.Parameter], lr: float, weight_decay: float):
        self.dense = torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay, foreach=True)
        self.sparse = torch.optim.SparseAdam(sparse, lr=lr)
        self.weight_decay = weight_decay
        super().__init__(dense + sparse, {"lr": lr})
        self.param_groups = self.dense.param_groups + self.sparse.param_groups  # the same dicts: one lr

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SparseDenseAdam.step takes no closure")
        if self.weight_decay:
            for p in self.sparse.param_groups[0]["params"]:
                if p.grad is not None:
                    grad = p.grad.coalesce()
                    rows = grad.indices()[0]
                    p.grad = torch.sparse_coo_tensor(grad.indices(), grad.values() + self.weight_decay * p[rows],
                                                     grad.shape, is_coalesced=True, check_invariants=False)
        self.dense.step()
        self.sparse.step()

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"dense", "sparse"}:
            raise ValueError("the checkpoint's optimizer state is not SparseDenseAdam's: was it saved with "
                             "model.sparse_embeddings false?")
        self.dense.load_state_dict(state_dict["dense"])
        self.sparse.load_state_dict(state_dict["sparse"])
        self.param_groups = self.dense.param_groups + self.sparse.param_groups


def make_optimizer(model: NCF, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (multi-tensor: one kernel per step for all parameters), or `SparseDenseAdam` when the model's
    embedding tables have sparse gradients (`model.sparse_embeddings`)."""
    sparse = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
    if not sparse:
        return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                foreach=True)
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    return SparseDenseAdam(dense, sparse, cfg.learning_rate, cfg.weight_decay)


def save_checkpoint(folder: Path, model: NCF, optimizer, scheduler, state: TrainState) -> None:
    """The checkpoint file, then its sha256 beside it, each written atomically (`ncf.files.atomic_path`)."""
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "state": state.__dict__ | {"phase": int(state.phase)}}
    with atomic_path(Path(folder) / CHECKPOINT_FILE, "checkpoint") as tmp:
        with open(tmp, "wb") as f:  # through a Python file: a full disk is an OSError saying so, not torch's own
            torch.save(payload, f)
        digest = _sha256(tmp)
    write_atomically(checksum_path(folder), f"{digest}  {CHECKPOINT_FILE}\n", "checkpoint checksum")


def copy_checkpoint(source: Path, folder: Path) -> Path:
    """The checkpoint in folder `source`, verified (a CheckpointError naming it if not intact), copied into
    `folder`: file then checksum, each atomically."""
    copy_atomically(verify_checkpoint(source), make_folder(folder, "checkpoint") / CHECKPOINT_FILE, "checkpoint")
    copy_atomically(checksum_path(source), checksum_path(folder), "checkpoint checksum")
    return Path(folder)


def verify_checkpoint(folder: Path) -> Path:
    """The checkpoint file in `folder` if its sha256 is the one written beside it, else a CheckpointError."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing")
    try:
        expected = checksum_path(folder).read_text().split()[0]
    except (OSError, IndexError):
        raise CheckpointError(f"checkpoint {path} cannot be verified: its checksum {checksum_path(folder)} is "
                              "missing or empty (a copy without it, or a write that did not finish)") from None
    actual = _sha256(path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {path.stat().st_size} bytes with "
                              f"sha256 {actual}, expected {expected}")
    return path


def load_checkpoint(folder: Path) -> dict:
    """The verified checkpoint in `folder` (CheckpointError naming the path if it is not intact)."""
    path = verify_checkpoint(folder)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # intact bytes that still do not load: not a checkpoint of this code
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {err}") from err


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


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (pages of Ray's object store it has read included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _same_on_all_ranks(values: list[float]) -> list[float]:
    """Rank 0's values everywhere, so every rank takes the same early-stopping decision."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def sample_unrated(users: np.ndarray, rated_keys: np.ndarray, n_movies: int, n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """`n` movies per entry of `users` drawn uniformly from those the user has not rated: [len(users) * n].

    `rated_keys` is the sorted array of user * n_movies + movie of every rated pair. Vectorised
    rejection: draw all, redraw only the rated ones, until none is left.
    """
    users = np.repeat(np.asarray(users, dtype=np.int64), n)
    movies = rng.integers(0, n_movies, size=len(users))
    todo = np.arange(len(users))
    while len(todo):
        keys = users[todo] * n_movies + movies[todo]
        position = np.minimum(np.searchsorted(rated_keys, keys), len(rated_keys) - 1)
        rated = rated_keys[position] == keys if len(rated_keys) else np.zeros(len(todo), bool)
        todo = todo[rated]
        movies[todo] = rng.integers(0, n_movies, size=len(todo))
    return movies


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # user indices, movie indices, ratings


class BatchSource(Protocol):
    """Where a rank's training batches come from, epoch by epoch: the same number of batches on every rank
    (DDP steps together). `InMemoryBatches` by default; Ray Data shards under `data.loader: ray_data`
    (`ncf.integrations.ray_data`)."""

    def epoch(self, phase: Phase, epoch: int) -> Iterable[Batch]:
        """This rank's batches of one epoch of `phase` (search: train; refit: train + validation)."""

    def figures(self) -> dict[str, float]:
        """Metrics about the epoch last iterated, added to that epoch's metrics."""


class InMemoryBatches:
    """Batches sliced from the in-memory splits (`ncf.data.epoch_batches`): every rank draws the same
    seeded permutation of the epoch and takes every `world_size`-th rating."""

    def __init__(self, config: Config, data: MovieLens, reporter: Reporter):
        self.splits, self.cfg = data.splits, config.train
        self.rank, self.world_size = reporter.rank, reporter.world_size
        self._refit: tuple[torch.Tensor, ...] | None = None

    def epoch(self, phase: Phase, epoch: int) -> Iterable[Batch]:
        if phase == Phase.SEARCH:
            tensors = self.splits.train.tensors()
        else:
            self._refit = self._refit or self.splits.train_and_validation().tensors()  # built once, when refitting
            tensors = self._refit
        return epoch_batches(tensors, self.cfg.batch_size, epoch=epoch, seed=self.cfg.seed, rank=self.rank,
                             world_size=self.world_size)

    def figures(self) -> dict[str, float]:
        return {}


def rated_keys(ratings: Ratings, n_movies: int) -> np.ndarray:
    return np.unique(ratings.user.astype(np.int64) * n_movies + ratings.movie)


def _batch_loss(wrapped: nn.Module, users, movies, ratings, negatives,
                config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's loss on one batch of rated pairs (and their sampled unrated movies), and the
    rating head's MSE, detached (nan without one): a tensor, so no step waits to read it."""
    objective, cfg = config.model.objective, config.train
    if objective == "rating":
        loss = nn.functional.mse_loss(wrapped(users, movies).rating.float(), ratings)
        return loss, loss.detach()
    n_pos = len(users)
    out = wrapped(torch.cat([users, users.repeat_interleave(cfg.negatives_per_positive)]),
                  torch.cat([movies, negatives]))
    labels = torch.zeros(len(out.logit), device=users.device)
    labels[:n_pos] = 1.0
    bce = nn.functional.binary_cross_entropy_with_logits(out.logit.float(), labels)
    if objective == "implicit":
        return bce, torch.full((), math.nan, device=users.device)
    mse = nn.functional.mse_loss(out.rating[:n_pos].float(), ratings)
    return cfg.rating_loss_weight * mse + cfg.interaction_loss_weight * bce, mse.detach()


def train_step(wrapped: nn.Module, optimizer: torch.optim.Optimizer, users: torch.Tensor, movies: torch.Tensor,
               ratings: torch.Tensor, negatives: torch.Tensor | None, config: Config,
               use_bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch (on the model's device); returns the loss and the rating head's MSE,
    detached tensors (nan MSE without a rating head)."""
    with torch.autocast(users.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
        loss, mse = _batch_loss(wrapped, users, movies, ratings, negatives, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), mse


PROGRESS_SECONDS = 30.0  # rank 0 says how far an epoch has got at most this often (a 25M-row epoch takes minutes)


def _train_epoch(wrapped: nn.Module, optimizer, batches: Iterable[Batch], keys: np.ndarray | None, n_movies: int,
                 config: Config, epoch: int, reporter: Reporter) -> tuple[float, float, int]:
    """One pass over this rank's batches (at most `train.max_steps_per_epoch`); returns the mean training loss,
    the rating head's mean MSE and the samples trained on.
    `keys`: the rated pairs (`rated_keys`) unrated movies are drawn against (implicit and joint objectives).

    The sums stay on the device and are read once, after the last step: no step waits for the one before."""
    cfg = config.train
    device = reporter.device
    use_bf16 = cfg.bf16_on_cpu if device.type == "cpu" else cfg.mixed_precision
    implicit = config.model.objective != "rating"
    rng = np.random.default_rng([cfg.seed, epoch, reporter.rank])
    wrapped.train()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss and MSE, weighted by batch length
    n_seen = 0
    started = noted = time.perf_counter()
    for step, (users, movies, target) in enumerate(itertools.islice(batches, cfg.max_steps_per_epoch), start=1):
        negatives = (torch.from_numpy(sample_unrated(users.numpy(), keys, n_movies, cfg.negatives_per_positive, rng))
                     .to(device) if implicit else None)
        users, movies, target = users.to(device), movies.to(device), target.to(device)
        sums += torch.stack(train_step(wrapped, optimizer, users, movies, target, negatives, config, use_bf16)) \
            * len(users)
        n_seen += len(users)
        if reporter.rank == 0 and time.perf_counter() - noted >= PROGRESS_SECONDS:
            noted = time.perf_counter()
            print(f"  epoch in progress: {step} steps, {n_seen:,} samples on rank 0, "
                  f"{n_seen / (noted - started):,.0f} samples/s", flush=True)
    loss_mean, mse_mean = (sums / max(n_seen, 1)).tolist()
    return loss_mean, mse_mean, n_seen


def _worker_figures(reporter: Reporter, n_samples: int) -> dict[str, float]:
    """Every rank's samples trained this epoch and peak memory so far (`worker/<rank>/...`), and the total
    `train_samples`: throughput and memory per worker, whatever the launcher and loader."""
    figures = figures_of_every_rank("worker", {"samples": n_samples, "peak_rss_gb": peak_rss_gib()}, reporter)
    return figures | {"train_samples": sum(v for k, v in figures.items() if k.endswith("/samples"))}


class Validation:
    """The validation figures of every epoch: rating error (models with a rating head) and the
    full-catalogue ranking of the validation slice by what would be served (`ncf.reranking.top_k`,
    with a retriever fitted on train alone) over `evaluation`'s users, `val_full_users` of them. Computed on
    rank 0 and shared with every rank."""

    def __init__(self, config: Config, data: MovieLens, rank: int):
        """Rank 0 keeps the validation slice, the movies each user has seen in train and the retriever fitted
        on train, never `data` itself: a caller may let the train split go once this is built."""
        self.config, self.rank = config, rank
        if rank != 0:
            return
        self.target, self.n_movies = data.splits.validation, data.n_movies
        self.users, self.movies, self.ratings = self.target.tensors()
        train = data.splits.train
        self.seen = SeenItems(train.user, train.movie, data.n_users)
        self.retriever = fit_retriever(config.retrieval, train, data.n_users, data.n_movies, config.train.seed)
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
                self.seen, self.target, self.n_movies, sample=self.config.evaluation)
            figures |= {f"val_{name}": ranking[name] for name in ("full_ndcg_at_10", "full_hit_rate_at_10",
                                                                  "full_users")}
            values = [figures[name] for name in names]
        metrics = dict(zip(names, _same_on_all_ranks(values), strict=True))
        if "val_loss" in metrics:
            metrics["val_rmse"] = math.sqrt(metrics["val_loss"])
        return metrics


def _report(reporter: Reporter, metrics: dict[str, float], model, optimizer, scheduler, state: TrainState) -> None:
    state.history.append(metrics)
    with tempfile.TemporaryDirectory(prefix="ncf-ckpt-") as tmp:
        checkpoint = None
        if reporter.rank == 0:
            checkpoint = Path(tmp)
            save_checkpoint(checkpoint, model, optimizer, scheduler, state)
        reporter.report(metrics, checkpoint)


def train_loop(config: Config, data: MovieLens, reporter: Reporter, batches: BatchSource | None = None,
               validation: Validation | None = None) -> TrainResult:
    """Early-stop on `train.monitor` over the validation slice, then (train.refit) retrain on train + validation.
    The batches come from `batches`, by default sliced from `data`'s splits (`InMemoryBatches`); the validation
    figures from `validation`, by default built from `data`'s train and validation splits.

    The refit phase repeats the best epoch count with the learning rates the search
    phase used, so the final model also learns from each user's most recent ratings,
    the ones closest in time to the test split.
    """
    cfg = config.train
    monitor, minimise = cfg.monitor, lower_is_better(cfg.monitor)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(config, data).to(reporter.device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min" if minimise else "max", factor=cfg.lr_plateau_factor, patience=cfg.lr_plateau_patience)
    state = TrainState()
    saved = reporter.restore()
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**(saved["state"] | {"phase": Phase(saved["state"]["phase"])}))
        state.resumed += 1
        print(f"resuming at epoch {state.epoch + 1} ({state.phase.name.lower()} phase, "
              f"best {monitor} {state.best_value:.4f})", flush=True)
    wrapped = reporter.prepare(model)
    validate = (validation or Validation(config, data, reporter.rank)) if state.phase == Phase.SEARCH else None
    batches = batches or InMemoryBatches(config, data, reporter)
    implicit = config.model.objective != "rating"
    keys = rated_keys(data.splits.train, data.n_movies) if implicit and state.phase == Phase.SEARCH else None

    while state.phase == Phase.SEARCH and state.epoch < cfg.max_epochs and state.stale_epochs < cfg.patience:
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_mse, n_samples = _train_epoch(wrapped, optimizer, batches.epoch(Phase.SEARCH, state.epoch),
                                                        keys, data.n_movies, config, state.epoch, reporter)
        train_seconds = time.perf_counter() - started  # the training pass alone, without validation
        val_figures = validate(model)
        value = val_figures[monitor]
        # The plateau scheduler follows validation MSE when the monitor is RMSE (the deck's setting).
        scheduler.step(val_figures["val_loss"] if monitor == "val_rmse" else value)
        improved = state.best_epoch == 0 or (value < state.best_value - 1e-5 if minimise
                                             else value > state.best_value + 1e-5)
        if improved:
            state.best_value, state.best_epoch, state.stale_epochs = value, state.epoch + 1, 0
            state.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state.stale_epochs += 1
        state.epoch += 1
        _report(reporter, _epoch_metrics(state, Phase.SEARCH, train_loss, train_mse, lr, started, monitor) | val_figures
                | batches.figures() | _worker_figures(reporter, n_samples)
                | {"improved": float(improved), "train_seconds": train_seconds},
                model, optimizer, scheduler, state)

    if cfg.refit and state.phase == Phase.SEARCH and state.best_epoch > 0:
        state.phase = Phase.REFIT
        torch.manual_seed(cfg.seed)
        model.reset_parameters()  # in place, identically on every rank: a DDP wrapper stays valid
        optimizer = make_optimizer(model, cfg)
        print(f"refitting on train + validation for {state.best_epoch} epoch(s)", flush=True)
    if state.phase == Phase.REFIT:
        search_lrs = [m["lr"] for m in state.history if m["phase"] == Phase.SEARCH]
        keys = rated_keys(data.splits.train_and_validation(), data.n_movies) if implicit else None
        while state.refit_epochs < state.best_epoch:
            started = time.perf_counter()
            lr = search_lrs[state.refit_epochs]
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_loss, train_mse, n_samples = _train_epoch(
                wrapped, optimizer, batches.epoch(Phase.REFIT, state.refit_epochs), keys, data.n_movies, config,
                state.refit_epochs, reporter)
            state.refit_epochs += 1
            state.epoch += 1
            _report(reporter, _epoch_metrics(state, Phase.REFIT, train_loss, train_mse, lr, started, monitor)
                    | batches.figures() | _worker_figures(reporter, n_samples), model, optimizer, scheduler, state)

    final = copy.deepcopy(model).cpu()
    final.load_state_dict(final_weights({"model": final.state_dict(), "state": state.__dict__}))
    return TrainResult(final.eval(), state.best_epoch, state.best_value, state.history)


def _epoch_metrics(state: TrainState, phase: Phase, train_loss: float, train_mse: float, lr: float, started: float,
                   monitor: str) -> dict[str, float]:
    metrics = {"epoch": state.epoch, "phase": float(phase), "train_loss": train_loss,
               f"best_{monitor}": state.best_value, "lr": lr, "epoch_seconds": time.perf_counter() - started}
    if not math.isnan(train_mse):
        metrics["train_rmse"] = math.sqrt(train_mse)
    return metrics


def fit_in_process(config: Config, data: MovieLens, checkpoint_dir: Path, resume: bool = False,
                   on_epoch: Callable[[dict[str, float]], None] | None = None) -> Path:
    """Train in this process (the `local` launcher); `resume` continues from the checkpoint in `checkpoint_dir`.
    An unwritable `checkpoint_dir` is a WriteError naming it before the first epoch, not after it."""
    check_writable(checkpoint_dir, "checkpoint")
    device = "cuda" if config.train.use_gpu else "cpu"
    train_loop(config, data, LocalReporter(checkpoint_dir, resume=resume, device=device, on_epoch=on_epoch))
    return checkpoint_dir
