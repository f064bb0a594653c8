"""A full disk or a read-only folder where reports, checkpoints or prepared data go: a clear error naming the
path, nothing half-written, the previous file intact.

A full disk is a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG as they would with
ENOSPC) set in a child process once its setup is done. A read-only folder is a root-owned folder written by
an unprivileged user (setpriv), since root writes through any mode bits; or a folder whose parent is a file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from ncf.config import Config
from ncf.files import WriteError, check_writable, write_atomically
from ncf.training.checkpoints import CHECKPOINT_FILE, load_checkpoint
from ncf.training.loop import fit_in_process

pytestmark = pytest.mark.unit

LIMIT_BYTES = 200  # any file written past setup is cut off beyond this size
NOBODY = 65534


def run_with_full_disk(setup: str, write: str, cwd: Path) -> subprocess.CompletedProcess:
    """`setup`, then `write` under the file size limit, in a child; exit 3 with `Type: message` on stderr
    when `write` raised."""
    code = textwrap.dedent(setup) + textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT_BYTES}, {LIMIT_BYTES}))
        try:
        {textwrap.indent(textwrap.dedent(write), '    ')}
        except Exception as err:
            print(f"{{type(err).__name__}}: {{err}}", file=sys.stderr)
            sys.exit(3)
        """)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files a failed write left behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith("."))


def test_a_report_on_a_full_disk_names_the_path_and_keeps_the_previous_one(tmp_path):
    report = tmp_path / "reports" / "metrics.json"
    report.parent.mkdir()
    report.write_text('{"previous": true}')
    done = run_with_full_disk("from ncf.files import write_atomically\n",
                              f"write_atomically({str(report)!r}, 'x' * 10_000, 'report')", tmp_path)
    assert done.returncode == 3, done.stderr
    assert f"WriteError: cannot write report {report}: [Errno 27] File too large" in done.stderr
    assert report.read_text() == '{"previous": true}'
    assert leftovers(report.parent) == []


def test_a_checkpoint_on_a_full_disk_names_the_path_and_keeps_the_previous_one(tmp_path):
    setup = f"""
        from pathlib import Path
        import torch
        from ncf.training.checkpoints import save_checkpoint
        from ncf.training.state import TrainState
        model = torch.nn.Linear(64, 64)
        optimizer = torch.optim.Adam(model.parameters())
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        folder = Path({str(tmp_path)!r})
        save_checkpoint(folder, model, optimizer, scheduler, TrainState(epoch=1))
        """
    done = run_with_full_disk(setup, "save_checkpoint(folder, model, optimizer, scheduler, TrainState(epoch=2))",
                              tmp_path)
    assert done.returncode == 3, done.stderr
    assert f"WriteError: cannot write checkpoint {tmp_path / CHECKPOINT_FILE}: [Errno 27] File too large" \
        in done.stderr
    assert load_checkpoint(tmp_path)["state"]["epoch"] == 1  # the previous one, intact and verified
    assert leftovers(tmp_path) == []


def test_prepared_data_on_a_full_disk_names_the_folder_and_leaves_nothing(tiny_config: Config, tiny_dir, tmp_path):
    data = tiny_config.data.model_copy(update={"prepared_dir": str(tmp_path / "prepared")})
    setup = f"""
        from pathlib import Path
        from ncf.config import DataConfig
        from ncf.prepared import location, prepare
        cfg = DataConfig.model_validate_json({data.model_dump_json()!r})
        """
    done = run_with_full_disk(setup, f"prepare(cfg, Path({str(tiny_dir)!r}))", tmp_path)
    assert done.returncode == 3, done.stderr
    target = tmp_path / "prepared" / data.name
    assert f"DataError: cannot write the prepared data to {target} ([Errno 27]" in done.stderr
    assert not target.exists()
    assert leftovers(tmp_path / "prepared") == []


@pytest.fixture
def root_owned_folder():
    """A folder only root may write, inside one everybody can reach (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to write as an unprivileged user")
    outer = Path(tempfile.mkdtemp(prefix="ncf-read-only-"))
    outer.chmod(0o755)
    (outer / "reports").mkdir(mode=0o755)
    yield outer / "reports"
    shutil.rmtree(outer)


def test_a_read_only_report_folder_names_the_path(root_owned_folder: Path):
    report = root_owned_folder / "metrics.json"
    code = (f"from ncf.files import check_writable, write_atomically\n"
            f"for write in (lambda: check_writable({str(root_owned_folder)!r}, 'report'),\n"
            f"              lambda: write_atomically({str(report)!r}, 'x', 'report')):\n"
            f"    try:\n        write()\n    except OSError as err:\n        print(err)\n")
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    refused_folder, refused_file = done.stdout.splitlines()
    assert refused_folder.startswith(f"the report folder {root_owned_folder} is not writable: [Errno 13] "
                                     "Permission denied"), refused_folder
    assert refused_file.startswith(f"cannot write report {report}: [Errno 13] Permission denied"), refused_file
    assert list(root_owned_folder.iterdir()) == []


def test_a_report_folder_under_a_file_is_refused_before_anything_is_written(tmp_path):
    """(The train and tune jobs refusing it: tests/integration/test_unwritable_outputs.py.)"""
    (tmp_path / "reports").write_text("a file where the reports folder should be")
    report = tmp_path / "reports" / "metrics.json"
    with pytest.raises(WriteError, match=rf"cannot create the report folder {tmp_path / 'reports'}: "):
        check_writable(report.parent, "report")
    with pytest.raises(WriteError, match=rf"cannot create the report folder {tmp_path / 'reports'}"):
        write_atomically(report, "{}", "report")
    assert leftovers(tmp_path) == []


def test_an_unwritable_checkpoint_folder_stops_training_before_the_first_epoch(tiny_config, tiny_movielens,
                                                                                tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoint folder should be")
    epochs: list = []
    with pytest.raises(WriteError, match=rf"cannot create the checkpoint folder {tmp_path / 'checkpoints' / 'run'}"):
        fit_in_process(tiny_config, tiny_movielens, tmp_path / "checkpoints" / "run", on_epoch=epochs.append)
    assert epochs == []


def test_writes_that_succeed_leave_only_the_file(tmp_path):
    assert check_writable(tmp_path / "new" / "folder", "report") == tmp_path / "new" / "folder"
    path = write_atomically(tmp_path / "new" / "folder" / "report.md", "# figures\n", "report")
    assert path.read_text() == "# figures\n"
    assert sorted(p.name for p in (tmp_path / "new" / "folder").iterdir()) == ["report.md"]
