"""The MLflow server's Deployment and Service: reachable beyond loopback on the Service's port, admitting
the Service's in-cluster names as Host headers, its settings read from keys the example Secret has."""

from __future__ import annotations

import fnmatch
import re

from workflows.deployment.base import SECRET_EXAMPLE, Context, DeploymentError, is_loopback


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
