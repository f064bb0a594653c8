"""`make retrain`: a challenger trained on the dataset plus the live ratings up to a cut, compared with the champion,
registered, and given the `challenger` alias when it passes the offline gate.

1. Every live rating of the ratings store (`feedback.uri`, NCF_FEEDBACK_URI); the newest `retrain.holdout_fraction`
   of them by seq are the fresh hold-out, the rest (up to the cut) training data (`ncf.live_training`).
2. The champion's settings (the model, train and retrieval sections of its registered version's config; where and
   on what it runs stays this config's), or `--preset`'s; `--set` overrides either.
3. A prepared copy of the dataset with the live ratings up to the cut (its manifest's `live` section records the
   cut, the number of live ratings and their SHA-256), trained on through the usual path (`train_in_run`: Ray Train
   or in-process), published and registered like `make train`'s, without the champion gate.
4. Champion and challenger on validation (the runs' `val_*` figures) and on the fresh hold-out
   (`workflows.retrain_evaluation`); the offline gate: on pass, alias `challenger` on the version; on fail, no
   alias. The version's tags (`challenger.offline_gate`, `retrain.*`) and description say which live ratings it saw.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from ncf import live_training, prepared
from ncf.config import SECTIONS, Config, config_from_dict, load_config, parse_override, with_values
from ncf.config_files import ConfigError, read_defaults
from ncf.config_migration import saved_section
from ncf.data import resolve_data_dir
from ncf.feedback_store import RatingsStore, feedback_uri
from ncf.integrations import mlflow_tracking
from ncf.metrics import BootstrapInterval
from ncf.training.loop import lower_is_better
from workflows.retrain_evaluation import (
    FIGURES,
    GateResult,
    HoldoutComparison,
    compare_on_holdout,
    interval_text,
    offline_gate,
)
from workflows.training_run import train_in_run

# The champion's settings a retrain takes; of `train`, the keys that say where and how it runs stay this config's.
SETTINGS = ("model", "train", "retrieval")
RUNTIME_KEYS = ("checkpoint_dir", "num_workers", "cpus_per_worker", "use_gpu", "max_failures", "storage_uri")


class NothingToRetrain(RuntimeError):
    """No champion, or no live ratings to learn from: the message says which."""


@dataclass(frozen=True)
class RetrainResult:
    model_name: str
    version: str  # the challenger's registered version
    run_id: str
    champion_version: str
    live: dict[str, int | str]  # cut_seq, ratings, sha256, holdout_ratings
    gate: GateResult
    validation: dict[str, dict[str, float]]  # "champion" / "challenger" -> val_* figure -> value
    holdout: HoldoutComparison
    seconds: float


def champion_settings(champion_config: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The defaults with the champion's model, train and retrieval sections (keys renamed or added since completed;
    `RUNTIME_KEYS` left at this config's), then `overrides`. Its data must be this config's dataset and split."""
    tree = read_defaults(SECTIONS)
    for section in SETTINGS:
        saved = saved_section(section, champion_config[section])
        if section == "train":
            saved = {key: value for key, value in saved.items() if key not in RUNTIME_KEYS}
        tree[section] = tree[section] | saved
    tree["preset"] = champion_config.get("preset", "deck")
    config = with_values(config_from_dict(tree), dict(parse_override(text) for text in overrides))
    theirs = champion_config.get("data", {})
    if theirs.get("name") != config.data.name or theirs.get("split") != config.data.split.model_dump(mode="json"):
        raise ConfigError(f"the champion was trained on {theirs.get('name')} split {theirs.get('split')}, this config "
                          f"names {config.data.name} split {config.data.split.model_dump(mode='json')}: set data.name "
                          "and data.split to the champion's")
    return config


def retrain(overrides: list[str] | tuple[str, ...] = (), preset: str | None = None,
            launcher: str = "ray") -> RetrainResult:
    """Run a retrain end to end (module docstring); raises NothingToRetrain without a champion or live ratings."""
    started = time.perf_counter()
    base = load_config(overrides, preset=preset)
    mlflow_tracking.setup()
    client = MlflowClient()
    name = mlflow_tracking.model_name(base)
    champion = mlflow_tracking.champion_version(name, client)
    if champion is None:
        raise NothingToRetrain(f"no {mlflow_tracking.CHAMPION} version of {name} in {mlflow_tracking.tracking_uri()}:"
                               " nothing to retrain (train one first: make train)")
    store = RatingsStore(feedback_uri(base.feedback))
    try:
        live = store.ratings()
    finally:
        store.close()
    if len(live) < 2:
        raise NothingToRetrain(f"{len(live)} live rating(s) in {store.shown}: a retrain needs at least 2 (some to "
                               "train on, the newest to hold out)")
    with tempfile.TemporaryDirectory(prefix="ncf-champion-") as tmp:
        incumbent = mlflow_tracking.load_recommender(f"models:/{name}/{champion.version}", tmp)
    config = base if preset else champion_settings(incumbent.config, overrides)
    cut = live_training.cut(live, config.retrain.holdout_fraction)
    print(f"retrain: {len(live)} live ratings; training on seq <= {cut.cut_seq} ({len(cut.training)}), holding out "
          f"the newest {len(cut.holdout)}; {'preset ' + preset if preset else 'champion'} version "
          f"{champion.version}'s settings ({config.preset})", flush=True)

    data_dir = resolve_data_dir(config.data)
    dataset = prepared.prepare(config.data, data_dir)
    root = Path(config.retrain.prepared_dir or Path(config.data.cache_dir) / "retrain").expanduser()
    target = live_training.live_location(root, cut, config.data.name)
    manifest = live_training.write_live_copy(dataset.folder, cut, target)
    print(f"retrain: prepared copy with live ratings in {target} ({manifest['live']['trained_ratings']} trained on, "
          f"{manifest['live']['new_users']} new users)", flush=True)
    train_config = with_values(config, {"data.prepared_dir": str(target.parent)})
    data = prepared.load_movielens(train_config.data, data_dir)

    with mlflow.start_run(run_name=f"{mlflow_tracking.run_name('retrain', config)} (cut {cut.cut_seq})",
                          log_system_metrics=True,
                          tags={"launcher": launcher, "retrain.champion_version": str(champion.version),
                                **live_training_tags(cut)}) as active:
        mlflow.log_dict(manifest["live"], "retrain/live.json")
        summary = train_in_run(train_config, data, data_dir, launcher, active.info.run_id)
        print(f"retrain: evaluating champion version {champion.version} and challenger version "
              f"{summary.model_version} on the fresh hold-out ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="ncf-challenger-") as tmp:
            challenger = mlflow_tracking.load_recommender(f"models:/{name}/{summary.model_version}", tmp)
        holdout = compare_on_holdout(incumbent, challenger, cut.training, cut.holdout, train_config.evaluation,
                                     max(train_config.registry.bootstrap_resamples, 200))
        metric = train_config.registry.champion_metric
        validation = {"champion": champion_validation(client, champion, metric),
                      "challenger": {k: float(v) for k, v in summary.validation.items() if k.startswith("val_")}}
        gate = offline_gate(metric, float(summary.validation[metric]), validation["champion"].get(metric),
                            lower_is_better(metric), train_config.retrain.validation_tolerance, holdout)
        record_outcome(client, name, summary.model_version, cut, holdout, gate, validation, metric)
    result = RetrainResult(name, summary.model_version, summary.run_id, str(champion.version), cut.record(), gate,
                           validation, holdout, time.perf_counter() - started)
    print(report(result, metric), flush=True)
    return result


def live_training_tags(cut: live_training.LiveCut) -> dict[str, str]:
    """Which live ratings a model saw, as the run's and the version's tags: retrain.cut_seq, retrain.live_ratings,
    retrain.live_sha256, retrain.holdout_ratings."""
    record = cut.record()
    return {"retrain.cut_seq": str(record["cut_seq"]), "retrain.live_ratings": str(record["ratings"]),
            "retrain.live_sha256": str(record["sha256"]), "retrain.holdout_ratings": str(record["holdout_ratings"])}


def champion_validation(client: MlflowClient, champion, metric: str) -> dict[str, float]:
    """The champion's validation figures as its run logged them; its gate entry tag for `metric` where the run
    lacks it."""
    figures = {k: v for k, v in client.get_run(champion.run_id).data.metrics.items()
               if k.startswith("val_")} if champion.run_id else {}
    entry = champion.tags.get(mlflow_tracking.entry_tag(metric))
    if metric not in figures and entry is not None:
        figures[metric] = float(entry)
    return figures


def record_outcome(client: MlflowClient, name: str, version: str, cut: live_training.LiveCut,
                   holdout: HoldoutComparison, gate: GateResult, validation: dict, metric: str) -> None:
    """The figures on the active run; the gate, the live ratings and the figures on the version (tags, description);
    alias `challenger` on it when it passed."""
    for model, figures in holdout.figures.items():
        mlflow.log_metrics({f"holdout/{model}/{k}": v for k, v in figures.items()})
    intervals = {"minus_champion_served": holdout.minus_served, "minus_champion_frozen": holdout.minus_frozen}
    for label, interval in intervals.items():
        if interval is not None:
            mlflow.log_metrics({f"holdout_ndcg_{label}": interval.difference,
                                f"holdout_ndcg_{label}_low": interval.low, f"holdout_ndcg_{label}_high": interval.high})
    tags = {"challenger.offline_gate": gate.tag, "challenger.offline_gate_reason": "; ".join(gate.reasons) or "passed",
            **live_training_tags(cut),
            "retrain.holdout_users": holdout.users,
            **{f"retrain.holdout_ndcg_{label}": interval_text(i) for label, i in intervals.items()},
            f"retrain.validation.{metric}.challenger": validation["challenger"].get(metric, "n/a"),
            f"retrain.validation.{metric}.champion": validation["champion"].get(metric, "n/a")}
    mlflow.set_tags(tags)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    described = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=(
        f"{described} Retrained with {len(cut.training)} live ratings (seq up to {cut.cut_seq}, sha256 "
        f"{cut.sha256[:12]}...); fresh hold-out of the {len(cut.holdout)} newest ({holdout.users} users): NDCG@10 "
        f"minus the champion as served {interval_text(holdout.minus_served)}. Offline gate {gate.tag}"
        + (f": {'; '.join(gate.reasons)}." if gate.reasons else ".")))
    if gate.passed:
        client.set_registered_model_alias(name, mlflow_tracking.CHALLENGER, version)


def report(result: RetrainResult, metric: str) -> str:
    """The figures, as printed at the end of `make retrain`."""
    lines = [f"{'':<18}" + "".join(f"{f:>22}" for f in FIGURES)]
    for model, figures in result.holdout.figures.items():
        lines.append(f"{model:<18}" + "".join(f"{figures[f]:>22.4f}" for f in FIGURES))
    champion_value = result.validation["champion"].get(metric, float("nan"))
    minus: dict[str, BootstrapInterval | None] = {"champion as served": result.holdout.minus_served,
                                                  "champion frozen": result.holdout.minus_frozen}
    return "\n".join([
        f"fresh hold-out: {result.live['holdout_ratings']} live ratings after seq {result.live['cut_seq']}, "
        f"{result.holdout.users} users with a relevant one", *lines,
        *(f"challenger NDCG@10 minus {label}: {interval_text(i)} (95% paired bootstrap over users)"
          for label, i in minus.items()),
        f"validation {metric}: challenger {result.validation['challenger'].get(metric, float('nan')):.4f}, "
        f"champion {champion_value:.4f}",
        f"{result.model_name} version {result.version}: offline gate {result.gate.tag}"
        + (f" ({'; '.join(result.gate.reasons)}): no alias" if result.gate.reasons
           else f", alias {mlflow_tracking.CHALLENGER}") + f" ({result.seconds:.0f} s)"])
