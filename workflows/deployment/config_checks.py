"""Cross-checks of what the manifests hand to Ray and the jobs: runtime envs as Ray reads them, the Serve
app's config against Ray Serve's schema and conf/serve.yaml, the jobs' entrypoints against conf/, and
the MLflow address every job and service uses."""

from __future__ import annotations

import argparse
import functools
import importlib
import shlex
from pathlib import Path
from typing import Any

import yaml

from ncf.config import Config, ConfigError, ServeConfig, load_config
from workflows.deployment.base import MLFLOW_ENV, MLFLOW_MANIFEST, Context, DeploymentError, is_loopback

JOB_MODULES = ("jobs.train", "jobs.retrain", "jobs.tune")
TRAINING_JOBS = ("jobs.train", "jobs.retrain")  # one training run: train.num_workers workers
# Deployment options the Serve app takes from conf/serve.yaml; a serveConfigV2 `deployments` entry
# setting them would silently win over conf/, so they belong under the application's `args`.
SERVE_SETTINGS = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests",
                  "ray_actor_options", "user_config")


def check_runtime_env(value: dict | str, what: str) -> dict:
    """A runtime env (YAML text or a mapping) as Ray reads it; unknown top-level fields are errors too
    (RuntimeEnv takes them for plugin options and ignores them)."""
    from ray.runtime_env import RuntimeEnv

    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) or {}
        except yaml.YAMLError as err:
            raise DeploymentError(f"{what} is not valid YAML: {err}") from None
    if not isinstance(value, dict):
        raise DeploymentError(f"{what} must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - set(RuntimeEnv.known_fields))
    if unknown:
        raise DeploymentError(f"{what}: unknown field(s) {', '.join(unknown)}")
    try:
        RuntimeEnv(**value)
    except Exception as err:  # RuntimeEnv raises TypeError, ValueError and others for bad values
        raise DeploymentError(f"{what} is not a valid Ray runtime env: {err}") from None
    return value


@functools.cache
def _import_attr(import_path: str) -> str | None:
    """None when `module:attr` (or `module.attr`) imports; else why not."""
    module_name, sep, attr = import_path.partition(":")
    if not sep:
        module_name, _, attr = import_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure makes the deployment fail the same way
        return f"{type(err).__name__}: {err}"
    if not hasattr(module, attr):
        return f"module {module_name} has no attribute {attr!r}"
    return None


def _unknown_keys(data: dict, model: Any, what: str) -> None:
    """Serve's schemas accept and drop unknown keys; a misspelt option must not vanish silently."""
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DeploymentError(f"{what}: unknown key(s) {', '.join(unknown)}")


def check_serve_config(text: str, ctx: Context) -> tuple[Any, list[ServeConfig]]:
    """serveConfigV2 as Ray Serve reads it, plus what Serve would only find out in the pod: the import
    path imports, the proxy listens beyond loopback, the app's settings come from conf/serve.yaml (`args`
    overriding keys it has), and the port is conf/serve.yaml's. Returns the schema and each app's config."""
    from pydantic import ValidationError
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DeploymentError(f"serveConfigV2 is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise DeploymentError("serveConfigV2 must be a YAML mapping")
    try:
        schema = ServeDeploySchema.model_validate(data)
    except ValidationError as err:
        raise DeploymentError(f"serveConfigV2 is not a valid Serve config: {err}") from None
    _unknown_keys(data, ServeDeploySchema, "serveConfigV2")
    _unknown_keys(data.get("http_options") or {}, HTTPOptionsSchema, "serveConfigV2 http_options")
    if is_loopback(schema.http_options.host):
        raise DeploymentError(f"serveConfigV2 http_options.host is {schema.http_options.host}, a loopback address: "
                              "unreachable from outside the pod; use 0.0.0.0")
    if schema.http_options.port != ctx.config.serve.port:
        raise DeploymentError(f"serveConfigV2 http_options.port is {schema.http_options.port}, "
                              f"conf/serve.yaml's port is {ctx.config.serve.port}")
    configs = []
    for i, (raw, app) in enumerate(zip(data.get("applications") or [], schema.applications, strict=True)):
        what = f"serveConfigV2 applications[{i}] ({app.name})"
        _unknown_keys(raw, ServeApplicationSchema, what)
        if app.host is not None and is_loopback(app.host):
            raise DeploymentError(f"{what}: host {app.host} is a loopback address, unreachable from outside the pod")
        problem = _import_attr(app.import_path)
        if problem:
            raise DeploymentError(f"{what}: import_path {app.import_path} does not import: {problem}")
        check_runtime_env(raw.get("runtime_env") or {}, f"{what} runtime_env")
        for j, deployment in enumerate(raw.get("deployments") or []):
            _unknown_keys(deployment, DeploymentSchema, f"{what} deployments[{j}]")
            fixed = sorted(set(deployment) & set(SERVE_SETTINGS))
            if fixed:
                raise DeploymentError(f"{what} deployments[{j}] sets {', '.join(fixed)}: the app takes its replica "
                                      "settings from conf/serve.yaml; override them under the application's args")
        args = dict(raw.get("args") or {})
        args.pop("tracking_uri", None)
        unknown = sorted(set(args) - set(ServeConfig.model_fields))
        if unknown:
            raise DeploymentError(f"{what} args: {', '.join(unknown)} not in conf/serve.yaml")
        try:
            configs.append(ServeConfig.model_validate(ctx.config.serve.model_dump() | args))
        except ValidationError as err:
            raise DeploymentError(f"{what} args do not make a valid serve config: {err}") from None
    return schema, configs


def check_mlflow_uri(uri: str | None, where: str, ctx: Context) -> None:
    """Runs and the model registry must go to the platform's MLflow server, not a pod-local SQLite file."""
    if ctx.mlflow_uri is None:
        raise DeploymentError(f"no MLflow Service (kind Service with a port) in {MLFLOW_MANIFEST} to point {where} at")
    if uri is None:
        raise DeploymentError(f"{where} sets no {MLFLOW_ENV}: runs would land in a file inside the pod; "
                              f"set it to {ctx.mlflow_uri}")
    if uri.rstrip("/") != ctx.mlflow_uri:
        raise DeploymentError(f"{where} {MLFLOW_ENV} is {uri}, the MLflow Service is {ctx.mlflow_uri}")


def parse_entrypoint(entrypoint: str, ctx: Context) -> tuple[str, Config]:
    """`python -m jobs.<name> --set k=v ...` -> (module, the config those overrides give with conf/)."""
    words = shlex.split(entrypoint)
    if len(words) < 3 or Path(words[0]).name not in ("python", "python3") or words[1] != "-m":
        raise DeploymentError(f"entrypoint {entrypoint!r} is not `python -m <module> ...`")
    module = words[2]
    if module not in JOB_MODULES:
        raise DeploymentError(f"entrypoint runs {module}, not one of {', '.join(JOB_MODULES)}")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args, _ = parser.parse_known_args(words[3:])
    try:
        config = load_config(args.overrides, conf_dir=ctx.root / "conf")
    except ConfigError as err:
        raise DeploymentError(f"entrypoint overrides do not load with conf/: {err}") from None
    return module, config
