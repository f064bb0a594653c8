"""What a request asks of the Ray cluster beyond what it has (`ray_cluster.shortfall`); the refusal itself, on a
real cluster: tests/integration/test_cluster_requests.py."""

from __future__ import annotations

import pytest

from ncf.config import load_config
from ncf.integrations.ray_cluster import shared_out, shortfall


@pytest.mark.parametrize(("workers", "per_worker", "offered", "short"), [
    (2, {"CPU": 1.0}, {"CPU": 2.0}, {}),
    (2, {"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 4.0}),  # the README example with the old default: never started
    (64, {"CPU": shared_out(2.0, 64)}, {"CPU": 2.0}, {"CPU": 64.0}),  # shared out: still one CPU each at least
    (2, {"CPU": shared_out(2.0, 2)}, {"CPU": 2.0}, {}),
    (1, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 16.0}, {"GPU": 1.0}),
    (1, {"CPU": 2.0, "GPU": 0.0}, {"CPU": 16.0}, {}),  # nothing asked of a resource the cluster lacks
])
def test_shortfall(workers, per_worker, offered, short):
    assert shortfall(workers, per_worker, offered) == short


def test_shared_out_gives_every_worker_its_share_and_at_least_one_cpu():
    assert [shared_out(16.0, n) for n in (1, 2, 3, 16, 32)] == [16.0, 8.0, 16 / 3, 1.0, 1.0]


def test_cpus_per_worker_defaults_to_the_cluster_shared_out_and_old_configs_load():
    assert load_config().train.cpus_per_worker is None
    assert load_config(["train.cpus_per_worker=2"]).train.cpus_per_worker == 2
