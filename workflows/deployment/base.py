"""What every deployment check uses: the context the files must agree with (installed Ray and torch,
conf/, the MLflow Service), reading a manifest's documents, walking its containers, and the rule that
images carry the installed Ray."""

from __future__ import annotations

import importlib.metadata
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ncf.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
PLATFORM = Path("platform")
KUBERAY = PLATFORM / "kuberay"
CRD_DIR = KUBERAY / "crds"
DOCKERFILES = (PLATFORM / "docker" / "Dockerfile.cpu", PLATFORM / "docker" / "Dockerfile.gpu")
CLUSTER_CONFIG = PLATFORM / "ray-cluster.yaml"
MLFLOW_MANIFEST = KUBERAY / "mlflow-server.yaml"
SECRET_EXAMPLE = KUBERAY / "secret.example.yaml"
GPU = "nvidia.com/gpu"
MLFLOW_ENV = "MLFLOW_TRACKING_URI"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
# Images (the project's, Ray's) whose tag starts with the Ray version they carry.
RAY_IMAGES = ("ncf-movielens", "rayproject/ray")


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


def json_path(path: Any) -> str:
    """A JSON-schema error path as `spec.workerGroupSpecs[0].replicas`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def raise_schema_errors(validator: jsonschema.protocols.Validator, doc: Any, what: str, root: tuple = ()) -> None:
    """Raise the schema errors (up to 3, by place in the document) as `<what> <path>: <message>; ...`."""
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        shown = [f"{json_path([*root, *e.absolute_path])}: {e.message}" for e in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DeploymentError(f"{what} " + "; ".join(shown) + more)


def is_loopback(host: str) -> bool:
    """Whether a listen address is loopback-only (unreachable from outside its pod or machine)."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e}


def quantity(value: Any) -> float:
    """A Kubernetes CPU or count quantity ("8", 8, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


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
