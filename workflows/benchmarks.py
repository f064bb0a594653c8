"""What the benchmark jobs share: one Ray Train fit's epoch history, their Markdown tables, and the machine line of
their records."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

from ncf.config import Config, with_values
from ncf.integrations.ray_train import fit_with_ray
from ncf.training.checkpoints import load_checkpoint


def ray_history(config: Config, data_dir: Path, workers: int, cpus: float, use_gpu: bool = False) -> list[dict]:
    """The epochs' figures of one Ray Train fit on `data_dir` with `workers` x `cpus` (Ray already started)."""
    values = {"train.num_workers": workers, "train.cpus_per_worker": cpus, "train.use_gpu": use_gpu}
    if use_gpu and workers > 1:  # NCCL has no sparse all-reduce
        values["model.sparse_embeddings"] = False
    with tempfile.TemporaryDirectory(prefix="ncf-bench-") as tmp:
        checkpoint = fit_with_ray(with_values(config, values), data_dir, run_id=None, into=Path(tmp))
        return load_checkpoint(checkpoint)["state"]["history"]


def markdown_table(rows: list[dict]) -> str:
    """Rows of the same keys as a Markdown table, the keys as its header."""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows])


def cpu_model() -> str:
    """The machine's processor as /proc/cpuinfo names it, with the count of logical CPUs."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{len(names) or os.cpu_count()} x {names[0] if names else platform.processor() or platform.machine()}"


def machine_line(load_before: tuple[float, ...]) -> str:
    """A record's machine: its processor, and the load average when the run started (`load_before`) and now."""
    return (f"- Machine: {cpu_model()}, shared with other developers: load average {load_before[0]:.1f} when the run "
            f"started, {os.getloadavg()[0]:.1f} when it ended.")
