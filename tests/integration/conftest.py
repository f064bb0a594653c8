"""Fixtures of the integration modules that start services of their own (tests/integration/services.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
import psutil
import pytest
import ray
import torch
from services import Server, mlflow_server

from ncf.recommender import Recommender


def _raylet_workers() -> list[psutil.Process]:
    """Every process under the raylet this driver started: its workers and agents."""
    workers = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker may exit while we look
            if child.name() == "raylet":
                workers += child.children(recursive=True)
    return workers


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A private Ray cluster for the module's in-driver Ray work, with the dashboard (its state API finds actors).

    Stopped with every process it started: a Ray worker can hang at exit after its work is done (seen with
    Ray Train's controller actor) and outlive `ray.shutdown()`, so the raylet's workers still alive 10 s
    after it are killed (these PIDs only)."""
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    workers = _raylet_workers()
    ray.shutdown()
    _, alive = psutil.wait_procs(workers, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """The tracking server of platform/mlflow-server.sh (PostgreSQL, artifacts in moto's S3 server), one per
    module that asks for it; every process stopped afterwards, also when a test failed."""
    with mlflow_server() as started:
        yield started


@pytest.fixture(scope="module")
def http(served_url: str) -> Iterator[httpx.Client]:
    """A client of the module's app (`served_url`)."""
    with httpx.Client(base_url=served_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def champion(model_store) -> Iterator[Recommender]:
    """The champion the module's app serves, as the app loads it, computing as a replica computes (one torch thread:
    serve.cpus_per_replica 1), so that answers compare exactly: another thread count sums in another order, and a
    near-tie in a folded-in ranking can swap."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model_store.recommender(model_store.champion)
    torch.set_num_threads(previous)
