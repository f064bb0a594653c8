"""Epoch time of the training loop: in-process vs Ray Train, against the hardware limit.

    python -m jobs.bench_train [--epochs 4] [--gpu]

CPU mode measures, side by side in one run: the loop in-process, under Ray Train
with 1 worker (2 CPUs) and with 2 workers (1 CPU each); the steady-state epoch is
the median of the epochs after the first. It sets the in-process epoch against the
model's FLOP count and this machine's measured fp32 matmul throughput. GPU mode
trains briefly with one worker per visible GPU and reports samples/s.
Results go to docs/benchmarks/train_epoch_time.{md,json} (or train_gpu.*).
"""

from __future__ import annotations

import json
import platform as host
import statistics
import sys
import time
from pathlib import Path

import torch

from ncf.config import Config, load_config, override_parser
from ncf.data import load_movielens, resolve_data_dir
from ncf.integrations.ray_train import fit_with_ray, init_ray
from ncf.model import count_flops_per_sample
from ncf.training import LocalReporter, load_checkpoint, train_loop

OUT_DIR = Path("docs") / "benchmarks"  # run from the repository root (`make bench-train`)


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def steady_epoch_seconds(history: list[dict]) -> float:
    times = [h["epoch_seconds"] for h in history]
    return statistics.median(times[1:] if len(times) > 1 else times)


def ray_history(config: Config, workers: int, cpus: float, use_gpu: bool = False) -> list[dict]:
    trial = config.model_copy(deep=True)
    trial.train.num_workers, trial.train.cpus_per_worker, trial.train.use_gpu = workers, cpus, use_gpu
    return load_checkpoint(fit_with_ray(trial, run_id=None))["state"]["history"]


def bench_cpu(config: Config) -> dict:
    data = load_movielens(config.data)
    n_train = len(data.splits.train)
    gflops = matmul_gflops()
    flops_epoch = 3 * count_flops_per_sample(config.model) * n_train  # forward + backward ~ 3x forward
    local = train_loop(config, data, LocalReporter(verbose=False)).history
    init_ray()
    one = ray_history(config, workers=1, cpus=2)
    two = ray_history(config, workers=2, cpus=1)
    in_process = steady_epoch_seconds(local)
    return {
        "machine": f"{host.processor() or host.machine()}, {torch.get_num_threads()} torch threads",
        "train_samples": n_train, "batch_size": config.train.batch_size, "epochs": config.train.max_epochs,
        "matmul_fp32_gflops": gflops, "model_flops_per_sample_train": 3 * count_flops_per_sample(config.model),
        "epoch_floor_seconds": flops_epoch / (gflops * 1e9),
        "in_process_epoch_seconds": in_process,
        "ray_1_worker_epoch_seconds": steady_epoch_seconds(one),
        "ray_2_workers_epoch_seconds": steady_epoch_seconds(two),
        "ray_1_worker_ratio": steady_epoch_seconds(one) / in_process,
        "ray_2_workers_ratio": steady_epoch_seconds(two) / in_process,
        "fraction_of_hardware_limit": flops_epoch / (gflops * 1e9) / in_process,
        "epoch_seconds": {"in_process": [h["epoch_seconds"] for h in local],
                          "ray_1_worker": [h["epoch_seconds"] for h in one],
                          "ray_2_workers": [h["epoch_seconds"] for h in two]},
    }


def bench_gpu(config: Config) -> dict:
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("no GPU visible: the GPU benchmark needs CUDA")
    init_ray()
    history = ray_history(config, workers=gpus, cpus=1, use_gpu=True)
    n_train = len(load_movielens(config.data).splits.train)
    epoch = steady_epoch_seconds(history)
    return {"gpus": gpus, "device": torch.cuda.get_device_name(0), "batch_size": config.train.batch_size,
            "mixed_precision_bf16": config.train.mixed_precision, "train_samples": n_train,
            "steady_epoch_seconds": epoch, "samples_per_second": n_train / epoch,
            "epoch_seconds": [h["epoch_seconds"] for h in history]}


def to_markdown(title: str, result: dict, command: str) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in result.items() if not isinstance(v, dict))
    detail = json.dumps({k: v for k, v in result.items() if isinstance(v, dict)}, indent=2)
    return f"# {title}\n\nCommand: `{command}`\n\n| measure | value |\n|---|---|\n{rows}\n\n```json\n{detail}\n```\n"


def main(argv: list[str] | None = None) -> int:
    p = override_parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--gpu", action="store_true", help="short training on every visible GPU")
    args = p.parse_args(argv)
    config = load_config(args.overrides, preset=args.preset)
    config.data.dir = str(resolve_data_dir(config.data))
    config.train.max_epochs, config.train.patience, config.train.refit = args.epochs, args.epochs, False
    if args.gpu:
        name, title, result = "train_gpu", "GPU training throughput", bench_gpu(config)
    else:
        name, title, result = "train_epoch_time", "Epoch time: in-process vs Ray Train", bench_cpu(config)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"{name}.json").write_text(json.dumps(result, indent=2))
    command = "python -m jobs.bench_train " + " ".join(argv if argv is not None else sys.argv[1:])
    (OUT_DIR / f"{name}.md").write_text(to_markdown(title, result, command.strip()))
    print(to_markdown(title, result, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
