"""The browser tests run against the app the integration fixtures start (tests/integration/conftest.py):
loaded from its file, so both suites share one definition."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("serving_fixtures",
                                               Path(__file__).parents[1] / "integration" / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

model_store = _fixtures.model_store
served_url = _fixtures.served_url
