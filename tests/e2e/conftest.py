"""The browser tests run against the app the integration fixtures start (tests/integration/conftest.py),
loaded here from its file so that both suites share one definition."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("serving_fixtures",
                                               Path(__file__).parents[1] / "integration" / "conftest.py")
_fixtures = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
if not hasattr(_fixtures, "served_url"):
    _spec.loader.exec_module(_fixtures)

model_store = _fixtures.model_store
served_url = _fixtures.served_url
