"""A finished sweep, told: the leaderboard, what ASHA saved, and the Markdown report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ncf.config import Config, flatten
from ncf.evaluation import format_table
from workflows.publish import RunSummary
from workflows.sweep_trials import sweep_metric


def leaderboard(results, config: Config) -> pd.DataFrame:
    """One row per trial, best first: validation figures, epochs run, why it stopped, its values."""
    metric, mode = sweep_metric(config)
    monitor = config.train.monitor
    rows = []
    for result in results:
        history = result.metrics_dataframe
        row: dict[str, object] = {"trial": result.metrics.get("trial_id", Path(result.path).name)}
        if history is None or history.empty or "epoch" not in history:
            rows.append(row | {metric: math.nan, "epochs": 0, "stopped_by": "error"} | result.config)
            continue
        history = history.drop_duplicates("epoch", keep="last").sort_values("epoch")
        epochs = int(history["epoch"].max())
        improved = history["improved"].to_numpy() > 0
        stale = len(improved) - 1 - int(np.flatnonzero(improved)[-1]) if improved.any() else len(improved)
        if result.error:
            stopped_by = "error"
        elif epochs >= config.tune.max_epochs:
            stopped_by = "budget"
        elif stale >= config.train.patience:
            stopped_by = "patience"
        else:
            stopped_by = "asha"
        best = history.loc[history[monitor].idxmin() if mode == "min" else history[monitor].idxmax()]
        row |= {metric: float(history[metric].iloc[-1]), "best_epoch": int(best["epoch"]), "epochs": epochs,
                "stopped_by": stopped_by, "stale_epochs": stale}
        rows.append(row | result.config)
    board = pd.DataFrame(rows).sort_values(metric, ascending=mode == "min", na_position="last")
    board = board.reset_index(drop=True)
    board.index += 1
    return board


@dataclass
class EpochSavings:
    """Trial-epochs the sweep ran against what running every trial to completion would cost."""

    ran: int
    without_asha_max: int  # every trial to its epoch budget
    without_asha_min: int  # each trial ASHA stopped run on only until early stopping could end it

    def describe(self) -> str:
        ran = max(self.ran, 1)
        return (f"trial-epochs run: {self.ran}; every trial run to its epoch budget: {self.without_asha_max} "
                f"({self.without_asha_max / ran:.1f}x); at least {self.without_asha_min} "
                f"({self.without_asha_min / ran:.1f}x) if each trial ASHA stopped had then early-stopped "
                "as soon as train.patience allows")


def epoch_savings(board: pd.DataFrame, config: Config) -> EpochSavings:
    budget, patience = config.tune.max_epochs, config.train.patience
    ran = int(board["epochs"].sum())
    stopped = board["stopped_by"] == "asha"
    extra = np.minimum(budget - board["epochs"], patience - board["stale_epochs"].fillna(0))
    return EpochSavings(ran, len(board) * budget, ran + int(extra[stopped].sum()))


def format_board(board: pd.DataFrame, config: Config) -> str:
    """The leaderboard as a Markdown table (also what the terminal shows)."""
    keys = config.tune.searched_keys()
    columns = ["trial", sweep_metric(config)[0], "best_epoch", "epochs", "stopped_by", *keys]
    head = ["#", *[c.split(".")[-1] for c in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, row in board.iterrows():
        cells = [str(rank)] + [_cell(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else (f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.2e}")
    return str(value)


@dataclass
class SweepOutcome:
    name: str
    path: str  # the sweep's folder, or its s3:// URI
    parent_run_id: str
    board: pd.DataFrame
    savings: EpochSavings
    best_config: Config
    champion: RunSummary  # the best trial, refit, evaluated and registered
    decision: dict[str, str]
    seconds: float

    def report(self) -> str:
        """Leaderboard, ASHA savings, the best config's values and the metric table, as Markdown."""
        values = flatten(self.best_config)
        chosen = "\n".join(f"- `{key}`: {values[key]}" for key in self.best_config.tune.searched_keys())
        return "\n".join([
            f"# Sweep {self.name}", "",
            f"MLflow parent run `{self.parent_run_id}`; {len(self.board)} trials in {self.seconds / 60:.1f} min.",
            "", f"## Leaderboard ({sweep_metric(self.best_config)[0]} on the validation slice)", "",
            format_board(self.board, self.best_config),
            "", "## ASHA", "", self.savings.describe() + ".", "",
            "## Best trial", "", chosen, "",
            f"Refit on train + validation: {self.best_config.train.refit}. Registered as "
            f"`{self.champion.model_name}` version {self.champion.model_version}; champion decision: "
            f"**{self.decision['champion.decision']}** ({self.decision['champion.metric']} "
            f"{self.decision['champion.candidate_value']} vs champion {self.decision['champion.incumbent_value']}, "
            f"version {self.decision['champion.incumbent_version']}).", "",
            "## Test metrics (seed protocol)", "", "```", format_table(self.champion.metrics), "```", "",
        ])
