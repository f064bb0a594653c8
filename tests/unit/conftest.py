"""Unit tests run tiny models: one torch thread is as fast, and far faster on a busy 2-core machine."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _no_data_folder_from_the_environment(monkeypatch):
    """Hermetic: NCF_DATA_DIR (CI sets it for the real-data tests) would win over a test's own data.dir."""
    monkeypatch.delenv("NCF_DATA_DIR", raising=False)
