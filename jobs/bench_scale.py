"""Training at scale: throughput and worker memory on a 25M-rating dataset against ml-latest-small.

    python -m jobs.bench_scale [--large-dir data/synth/ml-25m] [--large-name ml-25m] [--steps 500]
                               [--full-epoch]

Every measurement trains the same model (the preset's, at its batch size) through the real path:
the prepared Parquet, the training loop, and for Ray Train the configured workers, once on
ml-latest-small and once on the large dataset, side by side in one run:

- in-process (the `local` launcher, batches from memory);
- Ray Train with `data.loader: ray_data`, 1 worker (2 CPUs) and 2 workers (1 CPU each);
- Ray Train with `data.loader: in_memory`, 1 worker: the memory a worker needs when it holds the splits.

Each run trains 2 epochs without refit, each epoch capped at `--steps` optimizer steps on the large
dataset (`train.max_steps_per_epoch`; ml-latest-small's epochs are shorter than the cap), with the
validation figures on a sample of 500 users (`evaluation.users`). Throughput is the second epoch's
samples over its training pass (`train_samples / train_seconds`: the first epoch warms up allocators
and the optimizer's state); the ratio is large over small. Worker memory is each worker's peak RSS
(`worker/<rank>/peak_rss_gb`). Results go to docs/benchmarks/scale.{md,json}. `--full-epoch` instead trains
one whole, uncapped epoch of the large dataset through Ray Data with 2 workers: each worker's peak RSS over a
whole epoch, in docs/benchmarks/scale_full_epoch.{md,json}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ncf.config import Config, load_config, override_parser, with_values
from ncf.data import resolve_data_dir
from ncf.files import write_atomically
from ncf.integrations.ray_cluster import init_ray
from ncf.prepared import load_movielens
from ncf.training.loop import train_loop
from ncf.training.reporting import LocalReporter
from ncf.training.validation import Validation
from workflows.benchmarks import markdown_table, ray_history

OUT_DIR = Path("docs") / "benchmarks"  # run from the repository root
SAMPLED_USERS = 500  # validation users ranked each epoch: the figures are not what is measured here
# name -> (launcher, loader, workers, CPUs per worker)
SETUPS = {"in-process": ("local", "in_memory", 1, 2), "ray_data, 1 worker": ("ray", "ray_data", 1, 2),
          "ray_data, 2 workers": ("ray", "ray_data", 2, 1), "in_memory, 1 worker": ("ray", "in_memory", 1, 2)}


def gib(values: list[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in values)


def measure(config: Config, data_dir: Path, setup: str) -> dict:
    launcher, loader, workers, cpus = SETUPS[setup]
    trial = with_values(config, {"data.loader": loader})
    started = time.perf_counter()
    if launcher == "local":
        data = load_movielens(trial.data, data_dir)
        history = train_loop(trial, data, LocalReporter(verbose=False), Validation(trial, data, rank=0)).history
    else:
        history = ray_history(trial, data_dir, workers, cpus)
    last = history[-1]
    rss = [last[f"worker/{rank}/peak_rss_gb"] for rank in range(workers)]  # rank 0 also validates
    print(f"  {setup} on {config.data.name}: {last['train_samples'] / last['train_seconds']:,.0f} samples/s, "
          f"worker peak RSS {gib(rss)} GiB ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"samples_per_s": last["train_samples"] / last["train_seconds"], "samples": int(last["train_samples"]),
            "train_seconds": last["train_seconds"], "worker_peak_rss_gb": rss,
            "epoch_train_seconds": [h["train_seconds"] for h in history]}


def bench(small: Config, small_dir: Path, large: Config, large_dir: Path) -> dict:
    rows = []
    for setup in SETUPS:
        figures = {config.data.name: measure(config, folder, setup) for config, folder in ((small, small_dir),
                                                                                             (large, large_dir))}
        s, b = figures[small.data.name], figures[large.data.name]
        rows.append({"setup": setup, f"{small.data.name} samples/s": round(s["samples_per_s"]),
                     f"{large.data.name} samples/s": round(b["samples_per_s"]),
                     "ratio": round(b["samples_per_s"] / s["samples_per_s"], 3),
                     f"{large.data.name} samples timed": b["samples"],
                     f"{large.data.name} peak RSS per rank (GiB)": gib(b["worker_peak_rss_gb"]),
                     f"{small.data.name} peak RSS per rank (GiB)": gib(s["worker_peak_rss_gb"])})
    result = {"model": f"{small.model.architecture}, embedding {small.model.embedding_dim}, "
                       f"{'sparse' if small.model.sparse_embeddings else 'dense'} embeddings",
              "batch_size": small.train.batch_size, "steps_per_epoch_cap": large.train.max_steps_per_epoch,
              "throughput": rows}
    return result


def to_markdown(result: dict, command: str) -> str:
    lines = ["# Training at scale", "", f"Command: `{command}`", "",
             f"Model: {result['model']}; batch {result['batch_size']}; epochs capped at "
             f"{result['steps_per_epoch_cap']} steps on the large dataset (`train.max_steps_per_epoch`).",
             "", "Throughput of the second epoch's training pass (samples / s), and each worker's peak RSS "
             "(rank 0 first: it also holds what validation needs):",
             "", markdown_table(result["throughput"])]
    lines += ["", "Reading the table:", "",
              "- `ratio` is the large dataset's throughput over ml-latest-small's, same setup, model and batch. "
              "ml-latest-small's epoch is only 18 steps at batch 4096, so what every epoch costs whatever its "
              "length (Ray Data's shuffle and stream start, the seeded permutation, the first steps' warm-up) "
              "weighs more there; the step alone is compared in `train_table_size.md`.",
              "- Peak RSS is each worker process's `ru_maxrss` (`worker/<rank>/peak_rss_gb`), pages of Ray's "
              "object store it read included. Rank 0 also computes the validation figures: it reads the train "
              "split once to fit the retriever and index each user's seen movies, then lets it go "
              "(`data.loader: ray_data`); with `in_memory` every worker holds every split.",
              "- Preparing the dataset (parse, validate, encode, split, Parquet) is measured in `prepare.md`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = override_parser(__doc__.splitlines()[0])
    p.add_argument("--large-dir", type=Path, default=Path("data/synth/ml-25m"),
                   help="the large dataset's folder (`make synth SHAPE=ml-25m` writes the default)")
    p.add_argument("--large-name", default="ml-25m", help="its data.name (default %(default)s)")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per epoch on the large dataset")
    p.add_argument("--full-epoch", action="store_true",
                   help="only one whole epoch of the large dataset through Ray Data, 2 workers (worker memory)")
    args = p.parse_args(argv)
    config = load_config(args.overrides, preset=args.preset)
    common = {"train.max_epochs": 2, "train.patience": 2, "train.refit": False, "evaluation.users": SAMPLED_USERS}
    small, small_dir = with_values(config, common), resolve_data_dir(config.data)
    large = with_values(config, common | {"data.name": args.large_name, "train.max_steps_per_epoch": args.steps})
    large_dir = args.large_dir.resolve()
    for data, folder in ((small.data, small_dir), (large.data, large_dir)):
        load_movielens(data, folder)  # prepared (or checked) once, before anything is timed
    init_ray()
    command = ("python -m jobs.bench_scale " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.full_epoch:
        whole = with_values(large, {"train.max_epochs": 1, "train.max_steps_per_epoch": None})
        setup = "ray_data, 2 workers"
        name, result = "scale_full_epoch", {"setup": setup, **measure(whole, large_dir, setup)}
        text = (f"# One whole epoch at scale\n\nCommand: `{command}`\n\n{result['setup']}, {large.data.name}: "
                f"{result['samples']:,} samples in {result['train_seconds']:.0f} s ({result['samples_per_s']:,.0f} "
                f"samples/s); peak RSS per rank {gib(result['worker_peak_rss_gb'])} GiB.\n")
    else:
        name, result = "scale", bench(small, small_dir, large, large_dir)
        text = to_markdown(result, command)
    write_atomically(OUT_DIR / f"{name}.json", json.dumps(result, indent=2), "report")
    write_atomically(OUT_DIR / f"{name}.md", text, "report")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
