"""The KubeRay manifests under platform/kuberay/: each document by its kind (RayJob, RayService, built-in
kinds), the Ray clusters they start (versions, images, a head that takes no work, room for the work
conf/ asks for), and the kustomization that renders them."""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from ncf.config import Config
from serving.ingress import ray_serve_env
from workflows.deployment.base import (
    CRD_DIR,
    GPU,
    MLFLOW_ENV,
    SECRET_EXAMPLE,
    Context,
    DeploymentError,
    about,
    check_image,
    check_ray_version,
    container_env,
    containers,
    load_documents,
    quantity,
    values_of,
)
from workflows.deployment.config_checks import (
    TRAINING_JOBS,
    check_mlflow_uri,
    check_runtime_env,
    check_serve_config,
    parse_entrypoint,
)
from workflows.deployment.kubernetes_schemas import (
    BUILTIN_KINDS,
    CRD_FILES,
    check_rayjob_rules,
    validate_builtin,
    validate_custom_resource,
)
from workflows.deployment.mlflow_server import check_mlflow_server
from workflows.deployment.scheduled_jobs import check_cronjob


@dataclass(frozen=True)
class Group:
    """A Ray node group as Ray sees it: pods, and the CPUs and GPUs each pod gives Ray."""

    name: str
    pods: int
    max_pods: int
    cpus: float
    gpus: float


def node_group(name: str, group: dict) -> Group:
    container = group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    params = group.get("rayStartParams") or {}
    cpus = params.get("num-cpus", limits.get("cpu", requests.get("cpu", 0)))
    gpus = params.get("num-gpus", limits.get(GPU, requests.get(GPU, 0)))
    pods = group.get("replicas", group.get("minReplicas", 0))
    return Group(name, int(pods), int(group.get("maxReplicas", pods)), quantity(cpus), quantity(gpus))


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
        groups.append(node_group(name, raw))
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise DeploymentError(f"{where} workerGroupSpecs: group names repeat ({', '.join(names)})")
    for group_spec in [head, *(spec.get("workerGroupSpecs") or [])]:
        for container in containers(group_spec["template"]):
            gpu = GPU in ((container.get("resources") or {}).get("limits") or {})
            check_image(container.get("image", ""), ctx, gpu=gpu)
    return groups


def check_job_resources(module: str, config: Config, groups: list[Group], where: str) -> str:
    """The entrypoint's worker settings fit the worker groups, and the GPUs they hold get used."""
    gpu_groups = [g for g in groups if g.gpus > 0]
    total_gpus = sum(g.pods * g.gpus for g in gpu_groups)
    if not gpu_groups:
        raise DeploymentError(f"{where} has no GPU worker group (a container requesting {GPU})")
    if module in TRAINING_JOBS:
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
    uri = (env.get("env_vars") or {}).get(MLFLOW_ENV) or container_env(head).get(MLFLOW_ENV)
    check_mlflow_uri(uri, where, ctx)
    module, config = parse_entrypoint(spec["entrypoint"], ctx)
    return f"{module}: {check_job_resources(module, config, groups, where)}"


def checked_rayjob(doc: dict, ctx: Context) -> str:
    """A RayJob held elsewhere (a ConfigMap a CronJob creates it from): its schema, then `check_rayjob`."""
    validate_custom_resource(doc, ctx.root / CRD_DIR)
    return check_rayjob(doc, ctx)


def check_rayservice(doc: dict, ctx: Context) -> str:
    """A RayService: its Serve config, and a cluster with room for conf/serve.yaml's replicas."""

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
        uri = ((raw.get("args") or {}).get("tracking_uri") or env_vars.get(MLFLOW_ENV)
               or container_env(head).get(MLFLOW_ENV))
        check_mlflow_uri(uri, f"{where} application {app.name}", ctx)
        if serve.max_replicas * serve.cpus_per_replica > cpus:
            raise DeploymentError(f"{where}: serve.max_replicas={serve.max_replicas} x serve.cpus_per_replica="
                                  f"{serve.cpus_per_replica:g} CPUs do not fit the worker groups' {cpus:g} CPUs")
        if not any(g.cpus >= serve.cpus_per_replica for g in groups):
            raise DeploymentError(f"{where}: no worker pod has serve.cpus_per_replica={serve.cpus_per_replica:g} CPUs")
        for container in containers(cluster):
            for name, wanted in ray_serve_env(serve).items():
                if container_env(container).get(name) != wanted:
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
                notes.append(f"{kind} {doc['metadata']['name']}" + (
                    f" ({check_cronjob(doc, docs, ctx, checked_rayjob)})" if kind == "CronJob" else ""))
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
