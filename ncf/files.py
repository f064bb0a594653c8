"""Writing files so that a reader never sees half of one, and a failed write says which path failed.

Everything the jobs keep (checkpoints, reports) is written beside its final name, flushed to disk,
then renamed over it: a full disk, a read-only folder or a crash leaves the previous file (or none),
never a truncated one, and the error names the path. `check_writable` lets a job fail before hours
of training rather than at its end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


class WriteError(OSError):
    """A file or folder could not be written (read-only, full disk, a file where a folder should be)."""


def _kind(what: str) -> str:
    """The word before a path in messages ("report " for "report")."""
    return f"{what} " if what else ""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, what: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it is flushed to disk and renamed to `path`.

    On any failure the temporary file is removed and `path` is untouched; an OSError becomes a
    WriteError naming `path` (`what`, e.g. "checkpoint" or "report", before it in the message).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, WriteError):
            raise
        raise WriteError(f"cannot write {_kind(what)}{path.absolute()}: {err}") from err
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash once its folder is on disk
        _fsync(path.parent)


def write_atomically(path: Path, content: str | bytes, what: str = "") -> Path:
    """Write `content` to `path` through `atomic_path`; makes the parent folder. Returns `path`."""
    path = Path(path)
    make_folder(path.parent, what)
    with atomic_path(path, what) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
    return path


def copy_atomically(source: Path, path: Path, what: str = "") -> Path:
    """Copy `source` to `path` through `atomic_path`."""
    with atomic_path(path, what) as tmp:
        shutil.copyfile(source, tmp)
    return path


def make_folder(folder: Path, what: str = "") -> Path:
    """`folder` and its parents, or a WriteError naming it (a file in the way, no permission)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(f"cannot create the {_kind(what)}folder {folder.absolute()}: {err}") from err
    return folder


def check_writable(folder: Path, what: str = "") -> Path:
    """Make `folder` and write (then remove) a small file in it: a WriteError naming it if either fails.

    Runs at a job's start, so an unwritable output folder stops the job before training, not after.
    """
    folder = make_folder(folder, what)
    probe = folder / f".write-check-{uuid.uuid4().hex[:12]}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ncf")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise WriteError(f"the {_kind(what)}folder {folder.absolute()} is not writable: {err}") from err
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder
