"""The layering rule: the core library computes and imports neither Ray nor MLflow; the jobs' shared library
(workflows/) is imported by the entry points in jobs/ only, never by ncf or serving, and serving never
reaches into jobs; the repository documents itself."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The core: every module directly in ncf/ (ncf/integrations/ is the Ray and MLflow glue).
CORE = sorted(f"ncf.{p.stem}" for p in (ROOT / "ncf").glob("*.py") if p.stem != "__init__")


def imported_in_fresh_interpreter(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(json.loads(out.stdout))


def test_core_modules_import_neither_ray_nor_mlflow():
    loaded = imported_in_fresh_interpreter(CORE)
    assert set(CORE) <= loaded
    offenders = sorted(m for m in loaded if m.split(".")[0] in ("ray", "mlflow"))
    assert offenders == [], f"the core library pulled in {offenders[:5]}"


def test_the_core_holds_the_computing_modules():
    assert {"ncf.config", "ncf.data", "ncf.model", "ncf.metrics", "ncf.ranking", "ncf.baselines", "ncf.evaluation",
            "ncf.training", "ncf.recommender", "ncf.plots"} <= set(CORE)


def top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package, forbidden", [("ncf", {"jobs", "workflows", "serving"}),
                                                ("serving", {"jobs", "workflows"}), ("workflows", {"jobs"}),
                                                ("jobs", {"jobs"})])
def test_packages_do_not_reach_upwards(package: str, forbidden: set[str]):
    for path in (ROOT / package).rglob("*.py"):
        assert not top_level_imports(path) & forbidden, f"{path.relative_to(ROOT)} imports {forbidden}"


def test_every_job_is_an_entry_point_behind_a_make_target():
    """jobs/ holds entry points only (what they share is in workflows/): each runs as `python -m jobs.<name>`,
    from a make target that `make help` lists."""
    makefile = (ROOT / "Makefile").read_text()
    for path in sorted((ROOT / "jobs").glob("*.py")):
        if path.stem == "__init__":
            continue
        assert 'if __name__ == "__main__":' in path.read_text(), f"{path.relative_to(ROOT)} is not an entry point"
        target = re.search(rf"^([a-z-]+):[^\n]*## [^\n]*\n(?:\t[^\n]*\n)*?\t\$\(PY\) -m jobs\.{path.stem}\b",
                           makefile, flags=re.MULTILINE)
        assert target, f"no make target with a ## help line runs jobs.{path.stem}"


def test_no_file_refers_outside_the_repository():
    """Docs and code cite only what the repository holds."""
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    outside = ("DESIGN" + ".md", "../" + "shared")
    for name in tracked:
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".html", ".txt", ""} and path.is_file():
            text = path.read_text(errors="ignore")
            assert not any(word in text for word in outside), f"{name} refers to something outside the repository"
