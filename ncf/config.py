"""Typed configuration: YAML files in `conf/` hold every default, once.

Each `conf/<section>.yaml` becomes one section of `Config`. Unknown keys and wrong
types are errors that name the key; `--set section.key=value` overrides any value.

Where the files are and how a preset layers over them: `ncf.config_files`. Configs saved with older
key names or before keys existed: `ncf.config_migration`. The `Section` base and the sections kept out of this
module (to keep it small): `ncf.config_sections`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ncf.config_files import ConfigError, read_defaults
from ncf.config_migration import current_key, with_current_keys
from ncf.config_sections import RetrainConfig, Section
from ncf.experiment import ExperimentConfig
from ncf.retrievers import NO_RETRIEVER, RETRIEVERS, retriever_class


class SplitConfig(Section):
    protocol: Literal["seed", "temporal", "random", "fold"]
    test_fraction: float = Field(gt=0, lt=1)
    validation_fraction: float = Field(ge=0, lt=1)
    seed: int
    fold: str = Field(min_length=1)  # the protocol `fold`: which of the dataset's own splits (ml-100k: u1..u5, ua, ub)


class DatasetSizes(Section):
    ratings: int = Field(gt=0)  # rows of the ratings file
    users: int = Field(gt=0)  # distinct users
    movies: int = Field(gt=0)  # rows of the movies file


class PublishedDataset(Section):
    """What GroupLens publishes for one dataset: the archive, the SHA-256 of its files (LF line endings)
    where known, the published sizes (null where the dataset changes over time, or for a folder that is
    not the published dataset). How each dataset is read is code: `ncf.movielens_files.specs.DATASETS`."""

    url: str
    sha256: dict[str, str]
    sizes: DatasetSizes | None


class DataConfig(Section):
    name: str
    dir: str | None
    cache_dir: str
    prepared_dir: str | None
    # How Ray Train workers get their batches: in memory, or streamed by Ray Data (ncf.integrations.ray_data).
    loader: Literal["in_memory", "ray_data"]
    split: SplitConfig
    datasets: dict[str, PublishedDataset] = Field(min_length=1)

    @property
    def published(self) -> PublishedDataset:
        """The archive, digests and sizes of the selected dataset (`data.name`)."""
        return self.datasets[self.name]

    @model_validator(mode="after")
    def _check_dataset(self) -> DataConfig:
        if self.name not in self.datasets:
            raise ValueError(f"data.name '{self.name}' is none of data.datasets: {', '.join(self.datasets)}")
        if self.split.protocol == "fold":
            from ncf.movielens_files.specs import (
                DATASETS,  # each format's folds are part of its reader; imported only here
            )

            folds = DATASETS[self.name].folds if self.name in DATASETS else ()
            if not folds:
                with_folds = [name for name, spec in DATASETS.items() if spec.folds]
                raise ValueError(f"data.split.protocol fold: {self.name} ships no folds (datasets with folds: "
                                 f"{', '.join(with_folds)}); use seed, temporal or random")
            if self.split.fold not in folds:
                raise ValueError(f"data.split.fold '{self.split.fold}' is not a fold of {self.name}: "
                                 f"{', '.join(folds)}")
        return self


class ModelConfig(Section):
    architecture: Literal["mlp", "gmf", "neumf", "history"]
    attention: bool
    objective: Literal["rating", "implicit", "joint"]
    embedding_dim: int = Field(gt=0)
    hidden_dims: list[int] = Field(min_length=1)
    dropouts: list[float]
    batch_norm: bool
    rating_min: float
    rating_max: float
    use_bias: bool
    use_genres: bool
    # nn.Embedding(sparse=True) + SparseAdam: each step updates only the rows its batch touched.
    sparse_embeddings: bool
    # The latest ratings a history model pools per user (`architecture: history`).
    history_length: int = Field(gt=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if len(self.dropouts) != len(self.hidden_dims):
            raise ValueError(
                f"model.dropouts has {len(self.dropouts)} entries but model.hidden_dims has "
                f"{len(self.hidden_dims)}: give one dropout per hidden layer"
            )
        if not all(0 <= p < 1 for p in self.dropouts):
            raise ValueError("model.dropouts must each be in [0, 1)")
        if self.rating_min >= self.rating_max:
            raise ValueError("model.rating_min must be below model.rating_max")
        return self


class TrainConfig(Section):
    seed: int
    batch_size: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    max_epochs: int = Field(gt=0)
    max_steps_per_epoch: int | None = Field(gt=0)
    refit: bool
    patience: int = Field(gt=0)
    lr_plateau_factor: float = Field(gt=0, lt=1)
    lr_plateau_patience: int = Field(ge=0)
    monitor: Literal["val_rmse", "val_full_ndcg_at_10"]
    negatives_per_positive: int = Field(gt=0)
    rating_loss_weight: float = Field(ge=0)
    interaction_loss_weight: float = Field(ge=0)
    checkpoint_dir: str
    num_workers: int = Field(gt=0)
    cpus_per_worker: float | None = Field(gt=0)  # None: the cluster's CPUs shared out among the workers
    use_gpu: bool
    mixed_precision: bool
    bf16_on_cpu: bool
    max_failures: int = Field(ge=0)
    # Ray Train and Tune storage: None = checkpoint_dir, or s3://bucket/prefix (ray_train.storage_location).
    storage_uri: str | None


class SequenceConfig(Section):
    """`retrieval.sequence`: what users rate next, blended into the retriever's scores (`ncf.retrievers.sequence`)."""

    weight: float = Field(ge=0)  # 0: off
    window: int = Field(gt=0)
    last: int = Field(gt=0)
    decay: float = Field(gt=0, le=1)


class RetrievalSettings(Section):
    """The retrieval stage's keys shared by every retriever; `RetrievalConfig` adds each registered retriever's own
    section."""

    retriever: str
    min_rating: float | None
    recency_half_life: float | None = Field(gt=0)
    recency_unit: Literal["rank", "days"]
    profile_rating_offset: float | None
    sequence: SequenceConfig
    n_candidates: int = Field(gt=0)
    rating_weight: float
    interaction_weight: float
    choose_on_validation: bool
    n_candidates_grid: list[int] = Field(min_length=1)
    rating_weight_grid: list[float] = Field(min_length=1)
    interaction_weight_grid: list[float] = Field(min_length=1)

    @field_validator("retriever")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name != NO_RETRIEVER:
            retriever_class(name)  # a name the registry lacks is an error listing the registered ones
        return name

    def without_sequence(self) -> Self:
        """These settings with the sequence signal off: the retriever alone (a baseline row, a benchmark's row)."""
        return self.model_copy(update={"sequence": self.sequence.model_copy(update={"weight": 0.0})})

    @model_validator(mode="after")
    def _check_grids(self) -> RetrievalSettings:
        if any(n <= 0 for n in self.n_candidates_grid):
            raise ValueError("retrieval.n_candidates_grid must hold positive counts")
        if self.profile_rating_offset is not None and self.profile_rating_offset >= (self.min_rating or 0.5):
            raise ValueError(f"retrieval.profile_rating_offset ({self.profile_rating_offset}) must be below the "
                             f"lowest rating a profile keeps (min_rating {self.min_rating or 0.5}): profile "
                             "weights are rating - offset and must be positive")
        return self


# `retrieval`: the shared keys and, as `retrieval.<name>`, each registered retriever's section typed by its
# `Settings` (ncf.retrievers.RETRIEVERS: registering a retriever adds its section here).
RetrievalConfig = create_model("RetrievalConfig", __base__=RetrievalSettings, __module__=__name__,
                               **{name: (retriever.Settings, ...) for name, retriever in RETRIEVERS.items()})


class RegistryConfig(Section):
    model_name: str | None = Field(min_length=1)
    champion_metric: str = Field(min_length=1)
    bootstrap_resamples: int = Field(ge=0)


class EvaluationConfig(Section):
    """Which held-out ratings are relevant, which users full ranking ranks (all with a relevant held-out movie,
    or a seeded sample of them) and where the test split's full ranking of the served recommender runs."""

    relevant_rating: float  # full ranking's relevance; /explain's "because you rated" draws from ratings this high
    seed_relevant_rating: float  # relevance in the deck's per-user ranking of its test movies (precision_at_10 ...)
    users: int | None = Field(gt=0)  # None: every user with a relevant held-out movie
    seed: int
    runner: Literal["local", "ray_data"]
    actors: int = Field(gt=0)
    users_per_block: int = Field(gt=0)
    cpus_per_actor: float = Field(gt=0)


# A registered model: models:/<name>@<alias> follows the alias, models:/<name>/<version> pins one.
MODEL_URI = r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))$"


class ServeConfig(Section):
    host: str
    port: int = Field(gt=0, lt=65536)
    model_uri: str = Field(pattern=MODEL_URI)
    poll_interval_s: float = Field(gt=0)
    warm_users: int = Field(ge=0)
    cache_users: int = Field(gt=0)
    answer_cache_mb: float = Field(ge=0)
    max_batch_size: int = Field(gt=0)
    batch_wait_timeout_s: float = Field(ge=0)
    min_replicas: int = Field(ge=1)
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float = Field(gt=0)
    max_ongoing_requests: int = Field(gt=0)
    cpus_per_replica: float = Field(gt=0)
    ingress: Literal["proxy", "haproxy"]
    proxy_grpc: bool
    max_body_bytes: int = Field(gt=0)
    live_updates: bool
    # The online experiment (ncf.experiment); a config saved before it existed runs none differently.
    experiment: ExperimentConfig = ExperimentConfig()

    @model_validator(mode="after")
    def _check_replicas(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("serve.min_replicas must not exceed serve.max_replicas")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("serve.max_ongoing_requests must be at least serve.max_batch_size")
        if self.warm_users > self.cache_users:
            raise ValueError("serve.warm_users must not exceed serve.cache_users")
        return self


class FeedbackConfig(Section):
    """Where live ratings are stored (`ncf.feedback_store`; env NCF_FEEDBACK_URI overrides `uri`)."""

    uri: str  # a SQLAlchemy database URL: sqlite:///<file> or postgresql+psycopg://user@host:port/database

    @field_validator("uri")
    @classmethod
    def _database_url(cls, uri: str) -> str:
        try:
            make_url(uri)
        except ArgumentError:
            raise ValueError(f"'{uri}' is not a database URL (sqlite:///feedback/ratings.db, "
                             "postgresql+psycopg://user@host:port/database)") from None
        return uri


class Distribution(Section):
    """One searched value, in exactly one form: `choice: [...]`, `uniform: [low, high]`,
    `loguniform: [low, high]` or `randint: [low, high]` (both ends included)."""

    choice: list[Any] | None = Field(default=None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> Distribution:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(type(self).model_fields)} (got {given or 'none'})")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]} needs low < high, got {list(bounds)}")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self


class TuneConfig(Section):
    num_samples: int = Field(gt=0)
    seed: int
    startup_trials: int = Field(ge=0)
    max_epochs: int = Field(gt=0)
    grace_period: int = Field(gt=0)
    reduction_factor: float = Field(gt=1)
    workers_per_trial: int = Field(gt=0)
    cpus_per_worker: float = Field(gt=0)
    gpus_per_worker: float = Field(ge=0)
    max_concurrent_trials: int | None = Field(gt=0)
    space: dict[str, dict[str, Distribution]] = Field(min_length=1)

    def searched_keys(self) -> list[str]:
        """`section.key` of every searched value: the names trials, Optuna, MLflow and reports share."""
        return [f"{section}.{key}" for section, keys in self.space.items() for key in keys]


class Config(Section):
    # The preset the values started from (conf/presets/<name>.yaml over the defaults); recorded with every run.
    preset: str = "deck"
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    retrieval: RetrievalConfig
    registry: RegistryConfig
    evaluation: EvaluationConfig
    serve: ServeConfig
    feedback: FeedbackConfig
    tune: TuneConfig
    retrain: RetrainConfig

    @model_validator(mode="after")
    def _check_search_space(self) -> Config:
        for section, keys in self.tune.space.items():
            for key in keys:
                if section not in SEARCHABLE or not _is_key(type(getattr(self, section)), current_key(
                        f"{section}.{key}").partition(".")[2]):
                    raise ValueError(f"tune.space.{section}.{key} is not a {', '.join(SEARCHABLE)} config key")
        if self.train.monitor == "val_rmse" and self.model.objective == "implicit":
            raise ValueError("train.monitor val_rmse needs a rating head: an implicit model monitors "
                             "val_full_ndcg_at_10")
        if self.model.sparse_embeddings and self.train.use_gpu and self.train.num_workers > 1:
            raise ValueError("model.sparse_embeddings with train.use_gpu and train.num_workers > 1: DDP on GPUs "
                             "all-reduces with NCCL, which has no sparse all-reduce; use dense embeddings "
                             "(model.sparse_embeddings false) or one GPU")
        if self.model.architecture == "history" and self.data.loader == "ray_data":
            raise ValueError("model.architecture history reads every user's ratings in each worker, and "
                             "data.loader ray_data streams them past the workers instead: use data.loader in_memory")
        return self


SECTIONS = tuple(name for name in Config.model_fields if name != "preset")
SEARCHABLE = ("model", "train", "retrieval")


def _is_key(section: type[BaseModel], dotted_key: str) -> bool:
    """Whether `dotted_key` (`ease.regularization`) names a value of `section`, through its nested sections."""
    node: object = section
    for part in dotted_key.split("."):
        fields = node.model_fields if isinstance(node, type) and issubclass(node, BaseModel) else {}
        if part not in fields:
            return False
        node = fields[part].annotation
    return True


def _set_path(tree: dict, dotted_key: str, value: object) -> None:
    dotted_key = current_key(dotted_key)
    *parents, leaf = dotted_key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"unknown config key '{'.'.join(parents[: i + 1])}' in override '{dotted_key}'")
        node = child
    if leaf not in node:
        raise ConfigError(f"unknown config key '{dotted_key}'")
    node[leaf] = value


def with_values(config: Config, values: dict[str, object]) -> Config:
    """A copy of `config` with dotted keys replaced (`{"train.batch_size": 512}`), validated."""
    tree = config.model_dump()
    for key, value in values.items():
        _set_path(tree, key, value)
    return config_from_dict(tree)


def parse_override(text: str) -> tuple[str, object]:
    """`model.embedding_dim=64` -> ("model.embedding_dim", 64); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    return key.strip(), yaml.safe_load(raw)


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "config"
        msg = problem["msg"]
        if problem["type"] == "extra_forbidden":
            msg = "unknown key"
        elif problem["type"] == "missing":
            msg = "missing key"
        lines.append(f"{key}: {msg}")
    return "invalid config: " + "; ".join(lines)


def config_from_dict(tree: dict) -> Config:
    try:
        return Config.model_validate(with_current_keys(tree))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(overrides: list[str] | tuple[str, ...] = (), conf_dir: Path | None = None,
                preset: str | None = None) -> Config:
    """Read every section from `conf_dir` (default: `default_conf_dir()`), apply the preset
    (`<conf_dir>/presets/<preset>.yaml`, sections of values over the defaults), then the overrides; validate."""
    tree = read_defaults(SECTIONS, conf_dir, preset)
    for text in overrides:
        _set_path(tree, *parse_override(text))
    return config_from_dict(tree)


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config, so a run can be reproduced from its own record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def flatten(config: Config) -> dict[str, object]:
    """`{"model.embedding_dim": 128, ...}`: the form MLflow params and Tune spaces use."""
    flat: dict[str, object] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", config.model_dump())
    return flat


def override_parser(description: str) -> argparse.ArgumentParser:
    """The command line every entry point shares: `--preset name` and `--set section.key=value` overrides."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="apply conf/presets/NAME.yaml over the defaults (deck, history, neumf, recommender, tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set model.embedding_dim=64 (repeatable)")
    return p
