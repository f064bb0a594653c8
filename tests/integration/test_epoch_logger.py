"""EpochLogger while the MLflow store is unreachable: training does not wait, nothing is dropped, the buffered
metrics arrive in order with their own steps and times once the store answers, and flush() says when they cannot.
A stand-in client here; tests/integration/test_mlflow_outage.py stops a real tracking server under a real job."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.exceptions import MlflowException

from ncf.integrations.mlflow_tracking import EpochLogger

pytestmark = pytest.mark.integration


class FlakyStore:
    """A client whose log_batch fails while `down` is set."""

    tracking_uri = "http://127.0.0.1:1"

    def __init__(self):
        self.down = threading.Event()
        self.logged = []  # (run_id, metric) in the order received
        self.attempts = 0

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.attempts += 1
        if self.down.is_set():
            raise MlflowException("connection refused")
        self.logged.extend((run_id, m) for m in metrics)


def epoch(n: int) -> dict[str, float]:
    return {"epoch": n, "train_loss": 1.0 / n, "val_rmse": 0.9 + 0.01 * n}


@pytest.fixture
def store() -> FlakyStore:
    return FlakyStore()


@pytest.fixture
def logger(store: FlakyStore) -> EpochLogger:
    logger = EpochLogger("run-1", store.tracking_uri)  # an HTTP client connects only when used
    logger.client = store
    return logger


def test_metrics_reach_the_store_with_their_epoch_as_step(logger: EpochLogger, store: FlakyStore):
    for n in (1, 2):
        logger(epoch(n))
    logger.flush(timeout_s=10)
    assert [(run, m.key, m.step) for run, m in store.logged] == [
        ("run-1", "train_loss", 1), ("run-1", "val_rmse", 1), ("run-1", "train_loss", 2), ("run-1", "val_rmse", 2)]
    assert logger.pending == 0


def test_an_unreachable_store_neither_stops_nor_slows_training_and_loses_nothing(logger: EpochLogger,
                                                                                  store: FlakyStore):
    store.down.set()
    started = time.perf_counter()
    for n in range(1, 6):
        logger(epoch(n))
    assert time.perf_counter() - started < 0.5  # the epochs did not wait for the store
    time.sleep(0.2)
    assert store.attempts >= 1 and not store.logged
    assert logger.pending == 10 and logger.failed_sends >= 1

    store.down.clear()  # back: the sender's next try sends the backlog, then the next epoch's metrics follow
    logger(epoch(6))
    logger.flush(timeout_s=30)
    assert [(m.key, m.step) for _, m in store.logged] == [(key, n) for n in range(1, 7)
                                                          for key in ("train_loss", "val_rmse")]
    stamps = [m.timestamp for _, m in store.logged]
    assert stamps == sorted(stamps)  # the time each epoch was logged, not the time it was sent


def test_flush_raises_when_the_store_stays_unreachable(logger: EpochLogger, store: FlakyStore):
    store.down.set()
    logger(epoch(1))
    with pytest.raises(MlflowException, match=r"2 metric\(s\) of run run-1 not logged after 0.5 s.*127.0.0.1:1"):
        logger.flush(timeout_s=0.5)
    store.down.clear()
    logger.flush(timeout_s=30)  # nothing was dropped meanwhile
    assert len(store.logged) == 2


def test_flush_with_nothing_logged_returns_at_once(logger: EpochLogger):
    started = time.perf_counter()
    logger.flush(timeout_s=10)
    assert time.perf_counter() - started < 0.1
