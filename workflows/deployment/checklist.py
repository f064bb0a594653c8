"""Which check each file under platform/ gets, and the run over all of them: one line per file."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workflows.deployment.base import (
    CLUSTER_CONFIG,
    DOCKERFILES,
    KUBERAY,
    REPO_ROOT,
    Context,
    DeploymentError,
    load_context,
)
from workflows.deployment.cluster_launcher import check_cluster_config
from workflows.deployment.dockerfiles import check_dockerfile, check_dockerignore
from workflows.deployment.kuberay import check_kuberay_manifest, check_kustomization


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
