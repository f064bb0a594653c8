"""The layering rule: the core library computes and imports neither Ray nor MLflow, nor does the unit layer; the
jobs' shared library (workflows/) is imported by the entry points in jobs/ only, never by ncf or serving, and
serving never reaches into jobs; no module imports itself back through others; the repository documents itself."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ncf", "serving", "jobs")  # the project's own top-level packages
GLUE = ROOT / "ncf" / "integrations"  # the Ray and MLflow glue; every other module of ncf/ is the core


def module_name(path: Path, root: Path = ROOT) -> str:
    """`ncf/training/loop.py` -> `ncf.training.loop`; a package's `__init__.py` -> the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


CORE = sorted(module_name(p) for p in (ROOT / "ncf").rglob("*.py") if GLUE not in p.parents)
UNIT_TESTS = sorted((ROOT / "tests" / "unit").glob("*.py")) + [ROOT / "tests" / "conftest.py"]


def imported_in_fresh_interpreter(modules: list[str] = (), files: list[Path] = ()) -> dict[str, list[str]]:
    """What importing each of `modules` (by name), then each of `files` (by path, as pytest imports test modules:
    with their folders on sys.path) added to sys.modules, in one new interpreter."""
    code = ("import importlib, importlib.util, json, sys\n"
            "added = {}\n"
            f"for name in {list(modules)!r}:\n"
            "    before = set(sys.modules)\n"
            "    importlib.import_module(name)\n"
            "    added[name] = sorted(set(sys.modules) - before)\n"
            f"for path in {[str(f) for f in files]!r}:\n"
            "    before = set(sys.modules)\n"
            "    sys.path[:0] = [path.rsplit('/', 1)[0], path.rsplit('/', 2)[0]]\n"
            "    spec = importlib.util.spec_from_file_location(path.rsplit('/', 1)[1][:-3], path)\n"
            "    sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)\n"
            "    spec.loader.exec_module(module)\n"
            "    added[path] = sorted(set(sys.modules) - before)\n"
            "print(json.dumps(added))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def ray_or_mlflow(added: dict[str, list[str]]) -> dict[str, list[str]]:
    """Of each import, the Ray and MLflow modules it pulled in first (a few), where it pulled in any."""
    pulled = {what: [m for m in modules if m.split(".")[0] in ("ray", "mlflow")][:3] for what, modules in added.items()}
    return {what: modules for what, modules in pulled.items() if modules}


def test_core_modules_import_neither_ray_nor_mlflow():
    added = imported_in_fresh_interpreter(CORE)
    assert set(CORE) <= {m for modules in added.values() for m in modules}
    assert ray_or_mlflow(added) == {}, "the core library pulls in Ray or MLflow"


def test_the_core_holds_the_computing_modules():
    assert {"ncf.config", "ncf.data", "ncf.movielens_files.specs", "ncf.movielens_files.ratings",
            "ncf.movielens_files.movies", "ncf.movielens_files.verification", "ncf.prepared", "ncf.model",
            "ncf.metrics", "ncf.user_ratings", "ncf.ranking", "ncf.reranking_search", "ncf.retrievers.matrices",
            "ncf.baselines", "ncf.evaluation", "ncf.training.loop", "ncf.training.validation", "ncf.recommender",
            "ncf.plots"} <= set(CORE)
    assert not any(name.startswith("ncf.integrations") for name in CORE)


def test_the_unit_layer_imports_neither_ray_nor_mlflow():
    """Unit tests stay hermetic and fast: the Ray and MLflow glue is tested in tests/integration/."""
    assert ray_or_mlflow(imported_in_fresh_interpreter(files=UNIT_TESTS)) == {}, \
        "these unit test modules pull in Ray or MLflow"


# ----------------------------------------------------------------------------- import cycles


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` (module `name`) imports anywhere in it (in functions too), relative imports
    resolved: for `from a import b`, `a.b` when that is a module, else `a`."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules it imports. A package's `__init__` is left out of its own modules'
    edges: importing `a.b` runs `a/__init__.py` first, which is no cycle."""
    paths = {module_name(p, root): p for package in packages for p in (root / package).rglob("*.py")}
    known = set(paths)
    return {name: {t for t in imported_modules(path, name, known)
                   if t != name and not name.startswith(f"{t}.")} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph(ROOT, PACKAGES + tuple(extra_packages())))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def extra_packages() -> list[str]:
    """Top-level packages added since PACKAGES was written (any folder at the root with an __init__.py)."""
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in PACKAGES + ("tests",))


def test_the_cycle_check_finds_a_cycle(tmp_path: Path):
    """A function-level import closing the loop, through a relative import, is still a cycle; a package's
    __init__ importing its own modules is not."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.a import f\n")
    (package / "a.py").write_text("from .sub import b\n\ndef f():\n    return b.g()\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def g():\n    return 1\n")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) is None
    (package / "sub" / "b.py").write_text("def g():\n    from ..a import f\n    return f\n")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) == ["pkg.a", "pkg.sub.b", "pkg.a"]


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
