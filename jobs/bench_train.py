"""Epoch time of the training loop: in-process vs Ray Train, against the hardware limit.

    python -m jobs.bench_train [--epochs 6] [--gpu | --table-sizes]

CPU mode measures, side by side in one run: the loop in-process (with the configured
embeddings and precision, then with the other kind of embeddings, dense vs sparse, then in the other
precision, fp32 vs bf16: `train.bf16_on_cpu`, then without batch norm and dropout: what the rest of the
epoch costs, the bound on any speed-up of those layers), under Ray Train with 1 worker (2 CPUs) and with 2 workers
(1 CPU each), the configured loop and Ray Train taking turns twice; the steady-state epoch is the median of the
epochs after each run's first. It sets each precision's
in-process epoch (training pass + validation) and training pass alone against the model's FLOP count and
this machine's measured matmul throughput in that precision, reports the test RMSE each precision's model
reaches, and profiles one more training pass: how much of it the matrix products take and at
what speed they run, and the largest other operators. `--table-sizes` times the training step on random ids with the
embedding tables of ml-latest-small and of ML-25M, dense and sparse, at batch 256 and at
the configured batch: the step should cost what the batch touches, not the table size.
GPU mode trains briefly with one worker per visible GPU and reports samples/s.
Results go to docs/benchmarks/train_epoch_time.{md,json} (or train_table_size.*, train_gpu.*).
"""

from __future__ import annotations

import json
import platform as host
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

from ncf.config import Config, load_config, override_parser, with_values
from ncf.data import resolve_data_dir
from ncf.files import write_atomically
from ncf.integrations.ray_cluster import init_ray
from ncf.metrics import rmse
from ncf.model import NCF, count_flops_per_sample, forward_batched
from ncf.prepared import load_movielens
from ncf.training.batches import epoch_batches
from ncf.training.loop import train_loop, train_step
from ncf.training.optimizer import make_optimizer
from ncf.training.reporting import LocalReporter
from ncf.training.state import TrainResult, build_model
from ncf.training.validation import Validation
from workflows.benchmarks import markdown_table, ray_history

OUT_DIR = Path("docs") / "benchmarks"  # run from the repository root (`make bench-train`)
RAY_ROUNDS = 2  # turns of in-process and Ray Train runs
# (users, movies) of the embedding tables the table-size mode compares.
TABLE_SIZES = {"ml-latest-small": (610, 9_742), "ml-25m": (162_541, 62_423)}


def matmul_gflops(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def steady_epoch_seconds(*histories: list[dict], key: str = "epoch_seconds") -> float:
    """The median epoch of `histories` (runs of the same setup), each run's first epoch left out."""
    return statistics.median(h[key] for history in histories for h in (history[1:] if len(history) > 1 else history))


def random_negatives(config: Config, n_movies: int, n_positives: int) -> torch.Tensor | None:
    """Random movie ids standing in for the sampled unrated ones of the implicit and joint objectives (what they
    cost to score, not which they are); None for the rating objective."""
    if config.model.objective == "rating":
        return None
    return torch.randint(0, n_movies, (n_positives * config.train.negatives_per_positive,))


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear")  # where the model's FLOPs are spent


def train_pass_breakdown(config: Config, data, flops_per_sample: int) -> dict:
    """One profiled training pass (after a warm-up one) of a fresh model: the seconds spent in matrix
    products, their achieved GFLOP/s, and the operators taking the rest, largest first."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(config.train.seed)
    model = build_model(config, data).train()
    optimizer = make_optimizer(model, config.train)
    tensors = data.splits.train.tensors()

    def one_pass(epoch: int) -> None:
        for users, movies, ratings in epoch_batches(tensors, config.train.batch_size, epoch=epoch,
                                                    seed=config.train.seed):
            train_step(model, optimizer, users, movies, ratings, random_negatives(config, data.n_movies, len(users)),
                       config)

    one_pass(0)
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        started = time.perf_counter()
        one_pass(1)
        seconds = time.perf_counter() - started
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in profiled.key_averages()}
    matmul = sum(ops.get(name, 0.0) for name in MATMUL_OPS)
    rest = sorted(((k, v) for k, v in ops.items() if k not in MATMUL_OPS), key=lambda kv: -kv[1])[:8]
    return {"seconds": seconds, "matmul_seconds": matmul,
            "matmul_gflops": flops_per_sample * len(tensors[0]) / matmul / 1e9,
            "largest_other_operators_seconds": {k: round(v, 4) for k, v in rest}}


PRECISION = {False: "fp32", True: "bf16"}  # by train.bf16_on_cpu
MATMUL_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
EMBEDDINGS = {True: "sparse", False: "dense"}  # by model.sparse_embeddings


def in_process_variants(config: Config) -> dict[str, Config]:
    """The configured loop changed in one respect each, by name: the other kind of embeddings, the other precision,
    and no batch norm or dropout (what the rest of the epoch costs)."""
    embeddings = with_values(config, {"model.sparse_embeddings": not config.model.sparse_embeddings})
    precision = with_values(config, {"train.bf16_on_cpu": not config.train.bf16_on_cpu})
    bare = with_values(config, {"model.batch_norm": False, "model.dropouts": [0.0] * len(config.model.dropouts)})
    return {f"{EMBEDDINGS[embeddings.model.sparse_embeddings]}_embeddings": embeddings,
            PRECISION[precision.train.bf16_on_cpu]: precision, "without_batch_norm_and_dropout": bare}


def rmse_on_test(result: TrainResult, data) -> float:
    users, movies, ratings = data.splits.test.tensors()
    return rmse(ratings.numpy(), forward_batched(result.model, users, movies).rating.numpy())


def bench_cpu(config: Config, data_dir: Path) -> dict:
    data = load_movielens(config.data, data_dir)
    n_train = len(data.splits.train)
    gflops_before = {name: matmul_gflops(dtype=dtype) for name, dtype in MATMUL_DTYPE.items()}
    flops_per_sample = 3 * count_flops_per_sample(config.model)  # a training step: forward + backward ~ 3x forward
    flops_epoch = flops_per_sample * n_train
    variant_configs = in_process_variants(config)
    variants = {name: train_loop(trial, data, LocalReporter(verbose=False), Validation(trial, data, rank=0))
                for name, trial in variant_configs.items()}
    breakdown = train_pass_breakdown(config, data, flops_per_sample)
    # The limits are the faster of two measurements, before and after the in-process runs (a shared machine
    # slows some): the fractions below are not flattered by a slow moment.
    gflops = {name: max(before, matmul_gflops(dtype=MATMUL_DTYPE[name])) for name, before in gflops_before.items()}
    # What an epoch's training FLOPs take at each precision's limit; a fraction of the limit is floor / seconds.
    floor = {name: flops_epoch / (speed * 1e9) for name, speed in gflops.items()}

    # In-process (no Ray running) and Ray Train take turns, so that a moment when the shared machine is busier
    # slows both alike; Ray's own processes, which share the cores with the workers, count against Ray.
    runs: dict[str, list[list[dict]]] = {"in_process": [], "ray_1_worker": [], "ray_2_workers": []}
    for _ in range(RAY_ROUNDS):
        local = train_loop(config, data, LocalReporter(verbose=False), Validation(config, data, rank=0))
        runs["in_process"].append(local.history)
        init_ray()
        runs["ray_1_worker"].append(ray_history(config, data_dir, workers=1, cpus=2))
        runs["ray_2_workers"].append(ray_history(config, data_dir, workers=2, cpus=1))
        ray.shutdown()
    epochs = {name: steady_epoch_seconds(*histories) for name, histories in runs.items()}
    in_process, train_pass = epochs["in_process"], steady_epoch_seconds(*runs["in_process"], key="train_seconds")
    precision = PRECISION[config.train.bf16_on_cpu]
    other_precision = PRECISION[not config.train.bf16_on_cpu]
    figures = {
        "machine": f"{host.processor() or host.machine()}, {torch.get_num_threads()} torch threads",
        "train_samples": n_train, "batch_size": config.train.batch_size,
        "learning_rate": config.train.learning_rate, "embeddings": EMBEDDINGS[config.model.sparse_embeddings],
        "precision": precision, "epochs": config.train.max_epochs,
        "matmul_fp32_gflops": gflops["fp32"], "matmul_bf16_gflops": gflops["bf16"],
        "model_flops_per_sample_train": flops_per_sample,
        "epoch_floor_seconds": floor[precision],
        "in_process_epoch_seconds": in_process,
        "in_process_train_pass_seconds": train_pass,
    }
    for name, variant in variants.items():
        figures[f"in_process_epoch_seconds_{name}"] = steady_epoch_seconds(variant.history)
        figures[f"in_process_train_pass_seconds_{name}"] = steady_epoch_seconds(variant.history, key="train_seconds")
    figures |= {
        f"{other_precision}_speedup": in_process / figures[f"in_process_epoch_seconds_{other_precision}"],
        "ray_1_worker_epoch_seconds": epochs["ray_1_worker"],
        "ray_2_workers_epoch_seconds": epochs["ray_2_workers"],
        "ray_1_worker_ratio": epochs["ray_1_worker"] / in_process,
        "ray_2_workers_ratio": epochs["ray_2_workers"] / in_process,
        "fraction_of_hardware_limit": floor[precision] / in_process,
        "fraction_of_hardware_limit_train_pass": floor[precision] / train_pass,
    }
    for name, trial in variant_configs.items():  # each against the limit of its own precision
        figures[f"fraction_of_hardware_limit_{name}"] = (floor[PRECISION[trial.train.bf16_on_cpu]]
                                                         / figures[f"in_process_epoch_seconds_{name}"])
    return figures | {
        f"{other_precision}_epoch_against_{precision}_limit":
            floor[precision] / figures[f"in_process_epoch_seconds_{other_precision}"],
        "test_rmse": rmse_on_test(local, data),
        f"test_rmse_{other_precision}": rmse_on_test(variants[other_precision], data),
        "profiled_train_pass_seconds": breakdown["seconds"],
        "profiled_train_pass_matmul_seconds": breakdown["matmul_seconds"],
        "profiled_train_pass_matmul_gflops": breakdown["matmul_gflops"],
        "profiled_train_pass_matmul_fraction_of_limit": breakdown["matmul_gflops"] / gflops[precision],
        "epoch_seconds": {name: [[h["epoch_seconds"] for h in run] for run in histories]
                          for name, histories in runs.items()}
                         | {f"in_process_{name}": [h["epoch_seconds"] for h in variant.history]
                            for name, variant in variants.items()},
        "profiled_train_pass_largest_other_operators_seconds": breakdown["largest_other_operators_seconds"],
    }


def step_seconds(config: Config, tables: dict[str, tuple[int, int]], batch_size: int,
                 steps: int) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, optimizer) on random ids, per table size.
    The sizes take turns step by step, so a machine busy with other work slows them alike; 3 warm-up
    steps each (the first allocates the optimizer's state)."""
    torch.manual_seed(config.train.seed)
    trainers = {name: (model := NCF(n_users, n_movies, config.model).train(), make_optimizer(model, config.train))
                for name, (n_users, n_movies) in tables.items()}
    times: dict[str, list[float]] = {name: [] for name in tables}
    for _ in range(steps + 3):
        for name, (model, optimizer) in trainers.items():
            n_users, n_movies = tables[name]
            users, movies = torch.randint(0, n_users, (batch_size,)), torch.randint(0, n_movies, (batch_size,))
            ratings = config.model.rating_min + (config.model.rating_max - config.model.rating_min) * torch.rand(
                batch_size)
            negatives = random_negatives(config, n_movies, batch_size)
            started = time.perf_counter()
            train_step(model, optimizer, users, movies, ratings, negatives, config)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds[3:]) for name, seconds in times.items()}


def bench_table_sizes(config: Config, steps: int) -> dict:
    """Training-step throughput with small and ML-25M-sized embedding tables, dense and sparse, at batch 256
    and at the configured batch; `ratio` = large-table throughput / small-table throughput."""
    (small, small_size), (large, large_size) = TABLE_SIZES.items()
    rows = []
    for batch_size in sorted({256, config.train.batch_size}):
        for sparse in (False, True):
            trial = with_values(config, {"model.sparse_embeddings": sparse})
            seconds = step_seconds(trial, TABLE_SIZES, batch_size, steps)
            rows.append({"batch_size": batch_size, "embeddings": "sparse" if sparse else "dense",
                         f"{small}_samples_per_s": round(batch_size / seconds[small]),
                         f"{large}_samples_per_s": round(batch_size / seconds[large]),
                         "ratio": round(seconds[small] / seconds[large], 3)})
    return {"machine": f"{host.processor() or host.machine()}, {torch.get_num_threads()} torch threads",
            f"{small}_tables": f"{small_size[0]} users x {small_size[1]} movies",
            f"{large}_tables": f"{large_size[0]} users x {large_size[1]} movies",
            "embedding_dim": config.model.embedding_dim, "timed_steps": steps, "throughput": rows}


def bench_gpu(config: Config, data_dir: Path) -> dict:
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("no GPU visible: the GPU benchmark needs CUDA")
    init_ray()
    history = ray_history(config, data_dir, workers=gpus, cpus=1, use_gpu=True)
    n_train = len(load_movielens(config.data, data_dir).splits.train)
    epoch = steady_epoch_seconds(history)
    return {"gpus": gpus, "device": torch.cuda.get_device_name(0), "batch_size": config.train.batch_size,
            "mixed_precision_bf16": config.train.mixed_precision, "train_samples": n_train,
            "steady_epoch_seconds": epoch, "samples_per_second": n_train / epoch,
            "epoch_seconds": [h["epoch_seconds"] for h in history]}


def to_markdown(title: str, result: dict, command: str) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in result.items() if not isinstance(v, (dict, list)))
    tables = "".join(f"\n\n{k}:\n\n" + markdown_table(v) for k, v in result.items() if isinstance(v, list))
    details = {k: v for k, v in result.items() if isinstance(v, dict)}
    detail = f"\n\n```json\n{json.dumps(details, indent=2)}\n```" if details else ""
    return f"# {title}\n\nCommand: `{command}`\n\n| measure | value |\n|---|---|\n{rows}{tables}{detail}\n"


def main(argv: list[str] | None = None) -> int:
    p = override_parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6, help="epochs per setup; the median after the first is kept")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="short training on every visible GPU")
    mode.add_argument("--table-sizes", action="store_true",
                      help="training-step throughput with ml-latest-small vs ML-25M-sized embedding tables")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement of --table-sizes")
    args = p.parse_args(argv)
    config = with_values(load_config(args.overrides, preset=args.preset),
                         {"train.max_epochs": args.epochs, "train.patience": args.epochs, "train.refit": False})
    data_dir = None if args.table_sizes else resolve_data_dir(config.data)  # random ids: no data
    if args.gpu:
        name, title, result = "train_gpu", "GPU training throughput", bench_gpu(config, data_dir)
    elif args.table_sizes:
        name, title = "train_table_size", "Training step: small vs ML-25M-sized embedding tables"
        result = bench_table_sizes(config, args.steps)
    else:
        name, title, result = "train_epoch_time", "Epoch time: in-process vs Ray Train", bench_cpu(config, data_dir)
    write_atomically(OUT_DIR / f"{name}.json", json.dumps(result, indent=2), "report")
    command = "python -m jobs.bench_train " + " ".join(argv if argv is not None else sys.argv[1:])
    write_atomically(OUT_DIR / f"{name}.md", to_markdown(title, result, command.strip()), "report")
    print(to_markdown(title, result, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
