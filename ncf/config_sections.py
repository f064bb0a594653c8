"""The `Section` base of every config section, and sections kept out of `ncf.config` to keep it small.

`ncf.config.Config` assembles them; `conf/<section>.yaml` holds each one's defaults.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Read-only once validated: an assignment raises. Overrides build validated copies (`with_values`);
    paths and choices a run makes are passed as arguments or saved as artifacts, never written in here."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrainConfig(Section):
    """`make retrain` (`workflows.retrain`): the dataset plus the live ratings up to a cut, a challenger trained on
    them, and the offline gate that decides whether it becomes the `challenger` alias."""

    # The newest share of the live ratings (by seq) kept out of training as the fresh hold-out.
    holdout_fraction: float = Field(gt=0, lt=1)
    # How much worse than the champion's the challenger's validation `registry.champion_metric` may be (negative:
    # the challenger must beat it by at least that much); None: validation is reported, not gated on.
    validation_tolerance: float | None
    # Where the prepared copies with live ratings go (<prepared_dir>/<cut>/<data.name>); null: <data.cache_dir>/retrain.
    prepared_dir: str | None
