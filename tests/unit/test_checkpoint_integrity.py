"""A corrupt or truncated checkpoint is never loaded as a model: the loader names it, an in-process resume
falls back to the previous intact checkpoint, and a Ray resume stops with the path."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest

from ncf.config import Config, load_config
from ncf.data import MovieLens
from ncf.training.checkpoints import (
    CHECKPOINT_FILE,
    PREVIOUS_CHECKPOINT,
    CheckpointError,
    checksum_path,
    load_checkpoint,
)
from ncf.training.loop import fit_in_process, train_loop
from ncf.training.reporting import LocalReporter
from ncf.training.validation import Validation

pytestmark = pytest.mark.unit

# No dropout and no refit: a run is deterministic, so a resumed run can be compared with a straight one.
# The tiny preset's model (conf/presets/tiny.yaml) without its dropout.
DETERMINISTIC = ("model.dropouts=[0.0, 0.0]",
                 "train.batch_size=128", "train.refit=false", "train.patience=5")


def config(epochs: int) -> Config:
    return load_config([*DETERMINISTIC, f"train.max_epochs={epochs}"], preset="tiny")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {"truncated": truncate, "one byte flipped": flip_a_byte}


@pytest.fixture(scope="module")
def two_epochs(tiny_movielens: MovieLens, tmp_path_factory) -> Path:
    """A folder after two epochs: the latest checkpoint (epoch 2) and the previous one (epoch 1)."""
    folder = tmp_path_factory.mktemp("two-epochs")
    fit_in_process(config(2), tiny_movielens, folder)
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "checkpoints"))


def test_a_checkpoint_carries_its_sha256_and_loads(two_epochs):
    digest = hashlib.sha256((two_epochs / CHECKPOINT_FILE).read_bytes()).hexdigest()
    assert checksum_path(two_epochs).read_text() == f"{digest}  {CHECKPOINT_FILE}\n"  # sha256sum -c reads it
    assert load_checkpoint(two_epochs)["state"]["epoch"] == 2
    assert load_checkpoint(two_epochs / PREVIOUS_CHECKPOINT)["state"]["epoch"] == 1
    assert not list(two_epochs.glob(".*.tmp")), "no temporary file left behind"


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_the_loader_refuses_a_corrupt_checkpoint_and_names_it(two_epochs, tmp_path, corrupt):
    folder = copy_of(two_epochs, tmp_path)
    corrupt(folder / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match=rf"checkpoint {folder / CHECKPOINT_FILE} is corrupt or truncated"):
        load_checkpoint(folder)


def test_a_checkpoint_without_its_checksum_is_refused(two_epochs, tmp_path):
    folder = copy_of(two_epochs, tmp_path)
    checksum_path(folder).unlink()
    with pytest.raises(CheckpointError, match=rf"{folder / CHECKPOINT_FILE} cannot be verified"):
        load_checkpoint(folder)


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_resume_falls_back_to_the_previous_checkpoint(tiny_movielens, two_epochs, tmp_path, capfd, corrupt):
    straight = train_loop(config(3), tiny_movielens, LocalReporter(verbose=False),
                          Validation(config(3), tiny_movielens, rank=0))
    folder = copy_of(two_epochs, tmp_path)
    corrupt(folder / CHECKPOINT_FILE)
    history: list[dict] = []
    fit_in_process(config(3), tiny_movielens, folder, resume=True, on_epoch=history.append)

    warning = capfd.readouterr().err
    assert f"{folder / CHECKPOINT_FILE} is corrupt or truncated" in warning
    assert f"resuming from the previous checkpoint {folder / PREVIOUS_CHECKPOINT / CHECKPOINT_FILE}" in warning
    assert [m["epoch"] for m in history] == [2, 3]  # epoch 2 again, from epoch 1's checkpoint
    assert (folder / f"{CHECKPOINT_FILE}.corrupt").is_file(), "the corrupt file is kept aside for inspection"
    resumed = load_checkpoint(folder)["state"]
    assert [m["epoch"] for m in resumed["history"]] == [1, 2, 3]
    for got, want in zip(resumed["history"], straight.history, strict=True):
        assert got["val_rmse"] == pytest.approx(want["val_rmse"], rel=1e-5)
    assert load_checkpoint(folder / PREVIOUS_CHECKPOINT)["state"]["epoch"] == 2  # the intact one, not the corrupt


def test_resume_without_an_intact_checkpoint_is_a_clear_error(tiny_movielens, two_epochs, tmp_path):
    folder = copy_of(two_epochs, tmp_path)
    flip_a_byte(folder / CHECKPOINT_FILE)
    truncate(folder / PREVIOUS_CHECKPOINT / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError) as raised:
        fit_in_process(config(3), tiny_movielens, folder, resume=True)
    message = str(raised.value)
    assert f"{folder / CHECKPOINT_FILE} is corrupt or truncated" in message
    assert f"no intact checkpoint to fall back to: checkpoint {folder / PREVIOUS_CHECKPOINT / CHECKPOINT_FILE}" \
        in message


def test_a_ray_resume_from_a_corrupt_checkpoint_names_it(two_epochs, tmp_path):
    """Ray hands a restarted run only its latest checkpoint: the reporters verify it and stop clearly. A
    checkpoint on this machine's disk is read in place: no copy is left in the temporary folder."""
    import ray.train

    from ncf.integrations.ray_train import load_ray_checkpoint

    folder = copy_of(two_epochs, tmp_path)
    copies_before = set(Path(tempfile.gettempdir()).glob("checkpoint_tmp_*"))
    assert load_ray_checkpoint(ray.train.Checkpoint.from_directory(str(folder)))["state"]["epoch"] == 2
    assert set(Path(tempfile.gettempdir()).glob("checkpoint_tmp_*")) <= copies_before
    flip_a_byte(folder / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match=rf"is corrupt or truncated: .* \(Ray checkpoint {folder}\)"):
        load_ray_checkpoint(ray.train.Checkpoint.from_directory(str(folder)))
