"""Fixtures of the integration modules that start services of their own (tests/integration/services.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
from services import Server, mlflow_server


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A private Ray cluster for the module's in-driver Ray work, with the dashboard (its state API finds actors)."""
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """The tracking server of platform/mlflow-server.sh (PostgreSQL, artifacts in moto's S3 server), one per
    module that asks for it; every process stopped afterwards, also when a test failed."""
    with mlflow_server() as started:
        yield started
