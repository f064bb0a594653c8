"""The Ray cluster-launcher YAML (platform/ray-cluster.yaml) as `ray up` validates it, with a head that
takes no work, a GPU worker type and images that carry the installed Ray."""

from __future__ import annotations

import copy
import functools
import json
import logging
from pathlib import Path

import jsonschema

from workflows.deployment.base import Context, DeploymentError, about, check_image, load_documents, raise_schema_errors


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
        raise_schema_errors(jsonschema.Draft7Validator(_ray_schema()), config, "Ray's cluster schema:")
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
