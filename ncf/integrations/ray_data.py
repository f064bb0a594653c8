"""Ray Data input for Ray Train (`data.loader: ray_data`): the prepared Parquet streamed to the workers.

The driver reads the prepared train split (and, for the refit phase, train + validation) into the object
store once (`training_datasets`); Ray Train splits each dataset into one disjoint shard per worker with
equal row counts (`streaming_split(equal=True)`: DDP needs every rank to take the same number of steps),
reshuffled every epoch (a seeded `random_shuffle`, reseeded at each execution). A worker reads only the
small parts of the prepared folder (ids, movies, genres), and rank 0 builds its validation figures' inputs
from the train and validation splits, then lets the train split go (`worker_data`); no worker parses CSV
or holds the training split.

Each epoch's metrics carry every rank's shard figures, `shard/<rank>/rows` and `shard/<rank>/checksum`
(`pair_checksum` of the (user, movie) pairs it trained on): the shards of an epoch are disjoint and cover
the split when the rows add up to its size and the checksums to its checksum (modulo CHECKSUM_MODULUS).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ncf import prepared
from ncf.config import Config, ConfigError, EvaluationConfig
from ncf.data import MovieLens, Ratings, Splits
from ncf.evaluation import Ranker
from ncf.integrations.ray_cluster import init_ray
from ncf.recommender import Recommender
from ncf.training.batches import Batch
from ncf.training.reporting import Reporter, figures_of_every_rank
from ncf.training.state import Phase
from ncf.training.validation import Validation
from ncf.user_ratings import SeenItems

DATASETS = {Phase.SEARCH: "train", Phase.REFIT: "train_and_validation"}  # Ray Train dataset names
COLUMNS = {"user": torch.int64, "movie": torch.int64, "rating": torch.float32}  # what batches carry, as typed
CHECKSUM_MODULUS = 1 << 52  # checksums stay exact in a float64 metric
# Ray Data's read and shuffle tasks reserve no CPU: the training workers hold the CPUs, and a task waiting
# for one would stall every epoch (with one worker on all of a node's CPUs, forever).
TASK_OPTIONS = {"num_cpus": 0}


def check_supported(config: Config) -> None:
    """A ConfigError unless the run can train from Ray Data shards: the implicit and joint objectives
    draw unrated movies against every rated pair of the training split, which no worker holds here."""
    if config.model.objective != "rating":
        raise ConfigError(f"data.loader ray_data trains the rating objective only, not model.objective "
                          f"{config.model.objective}: negative sampling needs every rated (user, movie) pair on "
                          "each worker; use data.loader in_memory")


@dataclass(frozen=True)
class TrainingInput:
    """What the driver hands Ray Train: the prepared folder the workers read their metadata from, and
    the datasets to shard (named as in DATASETS)."""

    folder: Path
    datasets: dict[str, object]  # name -> ray.data.Dataset


def training_datasets(config: Config, data_dir: Path) -> TrainingInput:
    """The prepared copy of `data.name` in `data_dir` (built first if missing or stale), its train split (and with
    `train.refit` train + validation) read into the object store, reshuffled at every epoch."""
    import ray.data

    check_supported(config)
    folder = prepared.prepare(config.data, data_dir).folder

    def quiet(dataset):
        dataset.context.enable_progress_bars = False  # an epoch is one line of the log, not a screen of bars
        return dataset

    def read(part: str):
        return quiet(ray.data.read_parquet(str(folder / f"{part}.parquet"), **TASK_OPTIONS)
                     .select_columns(list(COLUMNS), **TASK_OPTIONS)).materialize()

    def shuffled(dataset):
        return quiet(dataset.random_shuffle(seed=ray.data.RandomSeedConfig(seed=config.train.seed), **TASK_OPTIONS))

    train = read("train")
    datasets = {DATASETS[Phase.SEARCH]: shuffled(train)}
    if config.train.refit:
        datasets[DATASETS[Phase.REFIT]] = shuffled(train.union(read("validation")))
    return TrainingInput(folder, datasets)


def worker_data(config: Config, folder: Path, rank: int) -> tuple[MovieLens, Validation]:
    """What a worker's training loop needs besides its batches: ids, movies and genres (no split), and its
    `Validation`. Rank 0, which computes the validation figures, reads the train split only to build them
    (the retriever and the movies each user has seen are fitted on it) and lets it go before training."""
    with_train = prepared.read(folder, splits=("train", "validation") if rank == 0 else ())
    validation = Validation(config, with_train, rank)
    return replace(with_train, splits=Splits(Ratings.none(), Ratings.none(), Ratings.none())), validation


def pair_checksum(users: np.ndarray, movies: np.ndarray) -> int:
    """An order-free checksum of (user, movie) pairs: the sum of a 64-bit mix of each pair, modulo
    CHECKSUM_MODULUS. Sums of disjoint parts add up (modulo) to the checksum of the whole."""
    z = (np.asarray(users, dtype=np.uint64) << np.uint64(32)) | np.asarray(movies, dtype=np.uint64)
    z = z + np.uint64(0x9E3779B97F4A7C15)  # splitmix64's finaliser: wraps around, as intended
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return int(np.add.reduce(z, dtype=np.uint64)) % CHECKSUM_MODULUS


class ShardBatches:
    """The `BatchSource` of a Ray Train worker under `data.loader: ray_data`: its shard of each epoch,
    in batches of `train.batch_size`; after each epoch, every rank's shard figures."""

    def __init__(self, config: Config, reporter: Reporter):
        import ray.train

        self.batch_size, self.reporter = config.train.batch_size, reporter
        phases = [Phase.SEARCH, Phase.REFIT] if config.train.refit else [Phase.SEARCH]
        self.shards = {phase: ray.train.get_dataset_shard(DATASETS[phase]) for phase in phases}
        self._figures: dict[str, float] = {}

    def epoch(self, phase: Phase, epoch: int) -> Iterator[Batch]:
        rows = checksum = 0
        for batch in self.shards[phase].iter_torch_batches(batch_size=self.batch_size, dtypes=COLUMNS):
            users, movies = batch["user"], batch["movie"]
            rows += len(users)
            checksum = (checksum + pair_checksum(users.numpy(), movies.numpy())) % CHECKSUM_MODULUS
            yield users, movies, batch["rating"]
        self._figures = figures_of_every_rank("shard", {"rows": rows, "checksum": checksum}, self.reporter)

    def figures(self) -> dict[str, float]:
        return self._figures


# ----------------------------------------------------------------------------- full ranking by an actor pool


class RankBlocks:
    """A Ray Data actor of `actor_pool_ranker`: takes the recommender, the users and their seen movies from the
    object store once, then ranks whole blocks of `users_per_block` consecutive users."""

    def __init__(self, shared: list, users_per_block: int, k: int):
        import ray

        # A list of references: Ray resolves only top-level arguments, these are fetched here, once.
        self.recommender, (self.users, self.seen) = ray.get(shared)
        self.users_per_block, self.k = users_per_block, k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each row of `batch` is a block index; returns one row per user: its block, position and top-k."""
        blocks, positions, tops = [], [], []
        for block in batch["block"]:
            start = int(block) * self.users_per_block
            position = np.arange(start, min(start + self.users_per_block, len(self.users)))
            blocks.append(np.full(len(position), block))
            positions.append(position)
            tops.append(self.recommender.rank(self.users[position], self.seen, self.k))
        return {"block": np.concatenate(blocks), "position": np.concatenate(positions), "top": np.concatenate(tops)}


def actor_pool_ranker(recommender: Recommender, cfg: EvaluationConfig) -> Ranker:
    """A `Ranker` with `recommender.rank`'s results, computed by a pool of `cfg.actors` Ray Data actors
    (`cfg.cpus_per_actor` CPUs each) over blocks of `cfg.users_per_block` users and gathered back in user
    order: full ranking of a large test split spread over a cluster. The recommender goes into the object
    store once; each call prints a progress line per block done."""
    import ray

    init_ray()
    shipped = ray.put(recommender)

    def rank(users: np.ndarray, seen: SeenItems, k: int) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64)
        n_blocks = -(-len(users) // cfg.users_per_block)
        if n_blocks == 0:
            return np.empty((0, k), dtype=np.int64)
        blocks = ray.data.from_items([{"block": b} for b in range(n_blocks)], override_num_blocks=n_blocks)
        blocks.context.enable_progress_bars = False  # the progress lines below say it in one line per block
        ranked = blocks.map_batches(
            RankBlocks, batch_size=1, batch_format="numpy", num_cpus=cfg.cpus_per_actor,
            compute=ray.data.ActorPoolStrategy(size=min(cfg.actors, n_blocks)),  # `concurrency=` is deprecated
            fn_constructor_kwargs={"shared": [shipped, ray.put((users, seen))], "users_per_block": cfg.users_per_block,
                                   "k": k})
        top, done, ranked_users, started = None, set(), 0, time.perf_counter()
        for batch in ranked.iter_batches(batch_size=None, batch_format="numpy"):
            if top is None:
                top = np.empty((len(users), *batch["top"].shape[1:]), dtype=batch["top"].dtype)
            top[batch["position"]] = batch["top"]
            done |= set(batch["block"].tolist())  # a block's users come back together, in one batch
            ranked_users += len(batch["position"])
            print(f"full ranking: {len(done)}/{n_blocks} blocks, {ranked_users}/{len(users)} users, "
                  f"{ranked_users / (time.perf_counter() - started):,.0f} users/s", flush=True)
        if len(done) != n_blocks:
            raise RuntimeError(f"full ranking by Ray Data returned {len(done)} of {n_blocks} blocks")
        return top

    return rank
