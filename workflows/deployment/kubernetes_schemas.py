"""Manifests against Kubernetes' own schemas: KubeRay's custom resources against the CRDs vendored in
platform/kuberay/crds/ (unknown fields rejected, as `kubectl apply` does) plus the operator's rules the
schemas lack, and built-in kinds with kubernetes-validate."""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import jsonschema

from workflows.deployment.base import DeploymentError, json_path, raise_schema_errors

# A Kubernetes version whose schemas kubernetes-validate bundles.
K8S_VERSION = "1.33.0"
CRD_FILES = {"RayJob": "ray.io_rayjobs.v1.json", "RayService": "ray.io_rayservices.v1.json"}
BUILTIN_KINDS = {"Deployment", "Service", "Secret", "PersistentVolumeClaim", "ConfigMap", "CronJob", "ServiceAccount",
                 "Role", "RoleBinding"}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
RAYJOB_NAME_MAX = 47
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


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
    raise_schema_errors(crd_validator(kind, crd_dir), doc, what)
    raise_schema_errors(object_meta_validator(), doc.get("metadata") or {}, what, root=("metadata",))
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
        raise DeploymentError(f"{kind} {name}: {json_path(err.absolute_path)}: {err.message} "
                              f"(Kubernetes {err.version} schema)") from None
    except kubernetes_validate.SchemaNotFoundError as err:
        raise DeploymentError(f"{kind} {name}: {err.message}") from None
    check_name(doc)
