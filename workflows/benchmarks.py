"""What the benchmark jobs share: one Ray Train fit's epoch history, and their Markdown tables."""

from __future__ import annotations

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
