"""A RayJob started on a schedule (platform/kuberay/cronjob-retrain.yaml): a CronJob whose pod creates the RayJob
held in a ConfigMap, with a ServiceAccount allowed to. The RayJob inside is checked like any RayJob manifest
(`check_rayjob`, passed in by `workflows.deployment.kuberay`); here, that the pieces reach each other."""

from __future__ import annotations

from collections.abc import Callable

import yaml

from workflows.deployment.base import Context, DeploymentError


def embedded_rayjobs(config_map: dict) -> dict[str, dict]:
    """The ConfigMap's data entries that hold a RayJob: key -> the RayJob document."""
    found = {}
    for key, text in (config_map.get("data") or {}).items():
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise DeploymentError(f"ConfigMap {config_map['metadata']['name']} {key} is not YAML: {err}") from None
        if isinstance(doc, dict) and doc.get("kind") == "RayJob":
            found[key] = doc
    return found


def _allowed(docs: list[dict], account: str, verb: str) -> bool:
    """Whether a Role bound to ServiceAccount `account` in `docs` grants `verb` on ray.io rayjobs."""
    roles = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Role"}
    for binding in (d for d in docs if d.get("kind") == "RoleBinding"):
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == account for s in binding.get("subjects", [])):
            continue
        role = roles.get(binding["roleRef"]["name"])
        for rule in (role or {}).get("rules", []):
            if "ray.io" in rule.get("apiGroups", []) and "rayjobs" in rule.get("resources", []) \
                    and verb in rule.get("verbs", []):
                return True
    return False


def check_cronjob(cronjob: dict, docs: list[dict], ctx: Context, check_rayjob: Callable[[dict, Context], str]) -> str:
    """The CronJob's pod mounts a ConfigMap of the same file holding a RayJob, which its command creates and which
    passes `check_rayjob`; its ServiceAccount exists and may create and delete RayJobs; runs never overlap."""
    name = cronjob["metadata"]["name"]
    where = f"CronJob {name}"
    spec = cronjob["spec"]
    if spec.get("concurrencyPolicy") != "Forbid":
        raise DeploymentError(f"{where}: concurrencyPolicy must be Forbid (two retrains at once compete for the "
                              "cluster and the same RayJob name)")
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    account = pod.get("serviceAccountName")
    if account not in {d["metadata"]["name"] for d in docs if d.get("kind") == "ServiceAccount"}:
        raise DeploymentError(f"{where}: serviceAccountName {account!r} is not a ServiceAccount of this file")
    for verb in ("create", "delete", "get"):
        if not _allowed(docs, account, verb):
            raise DeploymentError(f"{where}: ServiceAccount {account} has no Role of this file allowing {verb} on "
                                  "ray.io rayjobs")
    config_maps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    mounted = {v["name"]: v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
    notes = []
    for container in pod["containers"]:
        script = " ".join(container.get("command", []) + container.get("args", []))
        for mount in container.get("volumeMounts", []):
            config_map = config_maps.get(mounted.get(mount["name"], ""))
            if config_map is None:
                continue
            for key, rayjob in embedded_rayjobs(config_map).items():
                path, job = f"{mount['mountPath'].rstrip('/')}/{key}", rayjob["metadata"]["name"]
                if f"-f {path}" not in script or f"rayjob {job}" not in script:
                    raise DeploymentError(f"{where}: container {container['name']} must create {path} (`kubectl "
                                          f"create -f {path}`) and follow RayJob {job} (`kubectl get rayjob {job}`)")
                try:
                    notes.append(f"RayJob {job} ({check_rayjob(rayjob, ctx)}) on schedule {spec['schedule']!r}")
                except DeploymentError as err:
                    raise DeploymentError(f"{where}, ConfigMap {config_map['metadata']['name']} {key}: {err}") from None
    if not notes:
        raise DeploymentError(f"{where}: mounts no ConfigMap of this file holding a RayJob")
    return "; ".join(notes)
