"""The Ray cluster: joining one or starting a private one (`init_ray`), and refusing at once what it cannot hold
(`require`): Ray Train and Tune would otherwise wait for the resources for ever."""

from __future__ import annotations

import os
import sys
import time

from ncf.config import ConfigError
from ncf.ports import free_port

# A joined cluster may have an autoscaler that adds nodes for a request: how long a request it cannot hold yet
# waits for them before it is refused. A private cluster (no RAY_ADDRESS) never grows: refused at once.
GROWTH_WAIT_S = 120.0
POLL_S = 5.0


def init_ray() -> None:
    """Join the cluster at RAY_ADDRESS (`auto`: the one `ray start` started here), else start a private one.

    A private cluster gets RAY_ADDRESS pinned for its own processes: Ray Train's placement-group
    cleaner finds "its" cluster through that variable, and on a machine running other Ray clusters it
    would otherwise ask the wrong one and never free a stopped multi-worker trial's CPUs (the next
    trial then waits forever).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    dashboard_port = free_port()
    ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             runtime_env={"env_vars": {"RAY_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}})


def cluster_cpus() -> float:
    """The CPUs of the whole cluster (busy or not)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def shared_out(cpus: float, workers: int) -> float:
    """The CPUs each of `workers` holds when they share `cpus` out: at least one (a worker on a sliver of a CPU is
    no worker; more workers than CPUs is a request the cluster cannot hold)."""
    return max(1.0, cpus / workers)


def shortfall(workers: int, per_worker: dict[str, float], offered: dict[str, float]) -> dict[str, float]:
    """The resources `workers` x `per_worker` asks for beyond what the cluster `offered` in all: {name: asked}."""
    asked = {name: workers * amount for name, amount in per_worker.items() if amount > 0}
    return {name: amount for name, amount in asked.items() if amount > offered.get(name, 0.0) + 1e-9}


def require(workers: int, per_worker: dict[str, float], keys: str, growth_wait_s: float | None = None) -> None:
    """A ConfigError naming `keys` (the settings that asked) and what the cluster offers, unless the cluster holds
    `workers` x `per_worker` (e.g. {"CPU": 2, "GPU": 1}) in all. A joined cluster (RAY_ADDRESS) may grow: it is
    given `growth_wait_s` (default GROWTH_WAIT_S) to add nodes first; a private one is asked once."""
    import ray

    if growth_wait_s is None:
        growth_wait_s = GROWTH_WAIT_S if os.environ.get("RAY_ADDRESS") else 0.0
    deadline = time.monotonic() + growth_wait_s
    while short := shortfall(workers, per_worker, offered := ray.cluster_resources()):
        if time.monotonic() >= deadline:
            asked = ", ".join(f"{amount:g} {name}" for name, amount in short.items())
            has = ", ".join(f"{offered.get(name, 0.0):g} {name}" for name in short)
            raise ConfigError(f"{keys} ask the Ray cluster for {asked} in all, but it has {has}"
                              + (f" (after waiting {growth_wait_s:g} s for it to grow)" if growth_wait_s else "")
                              + ": ask for fewer workers or fewer resources per worker")
        print(f"waiting up to {deadline - time.monotonic():.0f} s for the Ray cluster to grow: {keys} ask for "
              f"{', '.join(f'{a:g} {n}' for n, a in short.items())}", file=sys.stderr, flush=True)
        time.sleep(POLL_S)
