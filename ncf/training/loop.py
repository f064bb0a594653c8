"""The training loop: early stopping on validation, then the refit on train + validation; and the in-process
launcher (`fit_in_process`). The launcher hands the loop its `Reporter`, its `Validation` and (optionally) its
`BatchSource`."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ncf.config import Config
from ncf.data import MovieLens
from ncf.files import check_writable
from ncf.training.batches import Batch, BatchSource, InMemoryBatches, rated_keys, sample_unrated
from ncf.training.checkpoints import save_checkpoint
from ncf.training.optimizer import make_optimizer
from ncf.training.reporting import LocalReporter, Reporter, worker_figures
from ncf.training.state import Phase, TrainResult, TrainState, build_model, final_weights
from ncf.training.validation import Validation

PROGRESS_SECONDS = 30.0  # rank 0 says how far an epoch has got at most this often (a 25M-row epoch takes minutes)


def lower_is_better(metric: str) -> bool:
    """Errors and losses fall as models improve; ranking figures rise."""
    return metric.endswith(("rmse", "mae", "loss"))


def _batch_loss(wrapped: nn.Module, users, movies, ratings, negatives,
                config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's loss on one batch of rated pairs (and their sampled unrated movies), and the
    rating head's MSE, detached (nan without one): a tensor, so no step waits to read it."""
    objective, cfg = config.model.objective, config.train
    if objective == "rating":
        loss = nn.functional.mse_loss(wrapped(users, movies, movies).rating.float(), ratings)
        return loss, loss.detach()
    n_pos = len(users)
    repeated = movies.repeat_interleave(cfg.negatives_per_positive)  # a sampled movie reads its positive's history
    out = wrapped(torch.cat([users, users.repeat_interleave(cfg.negatives_per_positive)]),
                  torch.cat([movies, negatives]), torch.cat([movies, repeated]))
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


def _report(reporter: Reporter, metrics: dict[str, float], model, optimizer, scheduler, state: TrainState) -> None:
    state.history.append(metrics)
    with tempfile.TemporaryDirectory(prefix="ncf-ckpt-") as tmp:
        checkpoint = None
        if reporter.rank == 0:
            checkpoint = Path(tmp)
            save_checkpoint(checkpoint, model, optimizer, scheduler, state)
        reporter.report(metrics, checkpoint)


def train_loop(config: Config, data: MovieLens, reporter: Reporter, validation: Validation,
               batches: BatchSource | None = None) -> TrainResult:
    """Early-stop on `train.monitor` over the validation slice, then (train.refit) retrain on train + validation.
    The validation figures come from `validation` (the search phase calls it after every epoch); the batches
    from `batches`, by default sliced from `data`'s splits (`InMemoryBatches`).

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
    batches = batches or InMemoryBatches(config, data, reporter)
    implicit = config.model.objective != "rating"
    keys = rated_keys(data.splits.train, data.n_movies) if implicit and state.phase == Phase.SEARCH else None

    while state.phase == Phase.SEARCH and state.epoch < cfg.max_epochs and state.stale_epochs < cfg.patience:
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_mse, n_samples = _train_epoch(wrapped, optimizer, batches.epoch(Phase.SEARCH, state.epoch),
                                                        keys, data.n_movies, config, state.epoch, reporter)
        train_seconds = time.perf_counter() - started  # the training pass alone, without validation
        val_figures = validation(model)
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
                | batches.figures() | worker_figures(reporter, n_samples)
                | {"improved": float(improved), "train_seconds": train_seconds},
                model, optimizer, scheduler, state)

    if cfg.refit and state.phase == Phase.SEARCH and state.best_epoch > 0:
        state.phase = Phase.REFIT
        torch.manual_seed(cfg.seed)
        model.reset_parameters()  # in place, identically on every rank: a DDP wrapper stays valid
        model.remember(data.splits.train_and_validation())
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
                    | batches.figures() | worker_figures(reporter, n_samples), model, optimizer, scheduler, state)

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
    train_loop(config, data, LocalReporter(checkpoint_dir, resume=resume, device=device, on_epoch=on_epoch),
               Validation(config, data, rank=0))
    return checkpoint_dir
