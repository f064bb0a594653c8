"""Fixtures of the integration modules that start services of their own (tests/integration/services.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from services import Server, mlflow_server


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """The tracking server of platform/mlflow-server.sh (PostgreSQL, artifacts in moto's S3 server), one per
    module that asks for it; every process stopped afterwards, also when a test failed."""
    with mlflow_server() as started:
        yield started
