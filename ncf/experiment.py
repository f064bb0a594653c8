"""The online experiment: champion against challenger on live traffic (serve.experiment).

While the registered model's `challenger` alias names another version than `champion`, Serve runs an experiment
between the two, named `experiment_id`. In `split` mode each user sees one variant's lists, always the same one
(`variant_of`: a hash of the experiment and the user, the same on every replica and across restarts); in `shadow`
mode everyone sees the champion's, and the challenger's list for the same request is only recorded. The lists
served (`ServedList`) and the ratings posted with their rec_id make the online metrics (`ncf.online_metrics`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from ncf.config_sections import Section

CHAMPION, CHALLENGER = "champion", "challenger"  # the variants, named as their registry aliases
Variant = Literal["champion", "challenger"]


class ExperimentConfig(Section):
    """serve.experiment: how an experiment shares traffic, what its metrics count, when Serve decides it."""

    share: float = Field(default=0.5, ge=0, le=1)  # of users sent to the challenger (split mode)
    mode: Literal["split", "shadow"] = "split"
    auto_promote: bool = False  # Serve decides itself once both variants served min_lists lists
    min_lists: int = Field(default=1000, gt=0)
    margin: float = Field(default=0.02, ge=0, lt=1)  # non-inferiority margin on the positive rate (absolute)
    window_s: float = Field(default=86_400, gt=0)  # a rating counts for a list received this soon after it
    positive_rating: float = 4.0
    log_interval_s: float = Field(default=60, gt=0)  # between two loggings of the metrics to MLflow


def experiment_id(champion_version: str, challenger_version: str) -> str:
    """"<champion version>-vs-<challenger version>": the registry's two versions name the experiment."""
    return f"{champion_version}-vs-{challenger_version}"


def assignment(experiment: str, user_id: int) -> float:
    """The user's place in [0, 1) in this experiment: uniform over users, the same in every process (a
    cryptographic hash, not Python's salted hash()), independent between experiments."""
    digest = hashlib.blake2b(f"{experiment}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def variant_of(experiment: str, user_id: int, share: float) -> Variant:
    """The variant a user sees in a split experiment: the challenger for the `share` of users placed below it."""
    return CHALLENGER if assignment(experiment, user_id) < share else CHAMPION


@dataclass(frozen=True)
class ServedList:
    """A list a variant served (or computed in shadow) during an experiment, as the store keeps it: one per
    experiment and rec_id. `shown_rec_id`: for a shadow list, the rec_id of the list the user saw instead."""

    experiment_id: str
    rec_id: str
    variant: Variant
    model_version: str
    user_id: int
    movie_ids: tuple[int, ...]
    served_at: float  # unix seconds
    shown_rec_id: str | None = None
