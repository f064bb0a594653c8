"""Checkpoint files: written with their sha256 beside them, verified before loading, and rotated in a folder
that keeps the latest checkpoint and the one before it (what an in-process run resumes from)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path

import torch

from ncf.config import Config
from ncf.data import MovieLens
from ncf.files import atomic_path, copy_atomically, make_folder, write_atomically
from ncf.model import NCF
from ncf.training.state import TrainState, build_model, final_weights

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "previous"  # a rotated folder's subfolder with the checkpoint before the latest


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


def model_from_checkpoint(folder: Path, config: Config, data: MovieLens) -> NCF:
    """The run's final model (`final_weights`) from the checkpoint in `folder`, in eval mode."""
    model = build_model(config, data)
    model.load_state_dict(final_weights(load_checkpoint(folder)))
    return model.eval()


# ----------------------------------------------------------------------------- a rotated folder


def rotate_in(checkpoint: Path, folder: Path) -> None:
    """Make the checkpoint in folder `checkpoint` the latest in `folder`; the latest so far becomes the
    previous one (the `previous/` subfolder), file by file."""
    previous = folder / PREVIOUS_CHECKPOINT
    if (folder / CHECKPOINT_FILE).exists():
        make_folder(previous, "checkpoint")
        for path in (folder / CHECKPOINT_FILE, checksum_path(folder)):
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, previous / path.name)
    copy_checkpoint(checkpoint, folder)


def load_latest_intact(folder: Path) -> dict | None:
    """The latest checkpoint in a rotated `folder` if intact; else, with a warning, the previous one (the corrupt
    latest is set aside as `<file>.corrupt`); else a CheckpointError. None when the folder holds neither."""
    latest, previous = folder, folder / PREVIOUS_CHECKPOINT
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
