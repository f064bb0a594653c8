"""Fixtures of the integration modules that start services of their own (tests/integration/services.py)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch
from services import Server, mlflow_server, private_ray

from ncf.recommender import Recommender


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A private Ray cluster for the module's in-driver Ray work (`services.private_ray`)."""
    with private_ray():
        yield


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
