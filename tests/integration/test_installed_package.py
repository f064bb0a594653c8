"""The package as a cluster image or `pip install .` has it: a non-editable install, run from an empty
directory outside the repository, finds its config, writes its store there and registers a model that loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel and installed (no dependencies: the test's own environment has them)."""
    # Built from a copy: an in-tree build would leave build/ in the repository (and reuse a stale one).
    source = tmp_path_factory.mktemp("source") / "ncf-movielens"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "mlruns", "checkpoints", "reports", "build", "data", "tests", "*.egg-info", "__pycache__"))
    build = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(build),
                    str(source)], check=True, capture_output=True, cwd=build)
    site = tmp_path_factory.mktemp("site")
    [wheel] = build.glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    assert sorted(p.name for p in (site / "ncf" / "conf").glob("*.yaml")) == [
        "data.yaml", "evaluation.yaml", "feedback.yaml", "model.yaml", "registry.yaml", "retrain.yaml",
        "retrieval.yaml", "serve.yaml", "train.yaml", "tune.yaml"]
    assert sorted(p.name for p in (site / "ncf" / "conf" / "presets").glob("*.yaml")) == [
        "deck.yaml", "history.yaml", "neumf.yaml", "recommender.yaml", "tiny.yaml"]
    return site


def run_installed(site: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NCF_CONF_DIR")}
    environment |= {"PYTHONPATH": str(site), "RAY_USAGE_STATS_ENABLED": "0"} | env
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)


def test_installed_package_trains_from_any_directory(installed: Path, tmp_path: Path, data_dir: Path,
                                                     tiny_training_args: list[str]):
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run_installed(installed, work, "-c",
                          "import ncf.config_files as c; print(c.__file__); print(c.default_conf_dir())")
    module_file, conf_dir = where.stdout.split()
    assert module_file.startswith(str(installed)) and conf_dir == str(installed / "ncf" / "conf")

    done = run_installed(installed, work, "-m", "jobs.train", "--launcher", "local", *tiny_training_args,
                         NCF_DATA_DIR=str(data_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "mlruns" / "mlflow.db").is_file()
    assert any((work / "mlruns" / "artifacts").rglob("MLmodel"))
    report = json.loads((work / "reports" / "metrics.json").read_text())
    assert report["mlflow"]["version"] == "1"
    assert not (installed / "mlruns").exists()

    load = ("import mlflow, pandas as pd\n"
            "model = mlflow.pyfunc.load_model('models:/ncf-movielens@champion')\n"
            "print(len(model.predict(pd.DataFrame({'user_id': [1]}), params={'k': 5})))")
    loaded = run_installed(installed, tmp_path, "-c", load,
                           MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip() == "5"


def test_ncf_conf_dir_points_the_installed_package_elsewhere(installed: Path, tmp_path: Path):
    conf = tmp_path / "my-conf"
    conf.mkdir()
    for path in (installed / "ncf" / "conf").glob("*.yaml"):
        (conf / path.name).write_text(path.read_text())
    model = conf / "model.yaml"
    model.write_text(model.read_text().replace("embedding_dim: 128", "embedding_dim: 24"))
    out = run_installed(installed, tmp_path, "-c", "from ncf.config import load_config; "
                        "print(load_config().model.embedding_dim)", NCF_CONF_DIR=str(conf))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "24"
