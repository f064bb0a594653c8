"""The champion gate: a registered version becomes `champion` only if it beats the incumbent on
`registry.champion_metric`, a validation figure (the test split is reported, never used to decide)."""

from __future__ import annotations

import mlflow

from ncf.config import Config
from ncf.integrations import mlflow_tracking
from ncf.training.loop import lower_is_better
from workflows.publish import RunSummary


def champion_figure(summary: RunSummary, config: Config) -> float:
    """The candidate's figure for the champion gate (`registry.champion_metric`)."""
    metric = config.registry.champion_metric
    if metric not in summary.validation:
        raise KeyError(f"registry.champion_metric {metric} is not among the run's figures "
                       f"({', '.join(sorted(summary.validation))})")
    return float(summary.validation[metric])


def gate(summary: RunSummary, config: Config) -> dict[str, str]:
    """Promote the version if it beats the champion on `registry.champion_metric`; tag the decision."""
    metric = config.registry.champion_metric
    decision = mlflow_tracking.promote_if_better(summary.model_name, summary.model_version,
                                                 champion_figure(summary, config), metric,
                                                 lower_is_better(metric))
    mlflow.set_tags(decision)
    return decision
