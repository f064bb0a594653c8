"""A loopback HTTP load generator light enough to share two cores with the service it measures: closed-loop or
paced clients over keep-alive connections, each phase's latencies, errors and the Serve processes' CPU time."""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import numpy as np
import psutil


@dataclass
class Phase:
    name: str
    path: str
    clients: int
    offered: float | None  # requests/s for paced phases
    latencies_ms: list[float]
    errors: int
    seconds: float
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # Serve processes' CPU: "ingress", "replicas"

    def cpu_ms_per_request(self, role: str) -> float:
        return 1000 * self.cpu_seconds.get(role, float("nan")) / max(len(self.latencies_ms), 1)

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def row(self) -> str:
        offered = f"{self.offered:.0f}" if self.offered else "closed loop"
        return (f"| {self.name} | `{self.path}` | {self.clients} | {offered} | {len(self.latencies_ms) + self.errors} "
                f"| {self.errors} | {self.seconds:.1f} | {self.throughput:.1f} | {self.percentile(50):.1f} "
                f"| {self.percentile(90):.1f} | {self.percentile(99):.1f} | {max(self.latencies_ms, default=0):.1f} |")


class Connection:
    """One keep-alive HTTP/1.1 connection with just enough protocol for these GETs and JSON POSTs. The load
    generator shares the 2 cores with the service: httpx costs about 3 ms of CPU per request here, this 0.2 ms."""

    def __init__(self, base: str, headers: dict[str, str] | None = None):
        url = urlsplit(base)
        self.host, self.port = url.hostname, url.port
        self.headers = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> int:
        """The status of GET `target`; the body is read and dropped. Reconnects after a failure."""
        return (await self.request("GET", target))[0]

    async def request(self, method: str, target: str, body: bytes | None = None) -> tuple[int, bytes]:
        """The status and body of `method target` (a `body` is sent as JSON); status 0 when the connection failed,
        which closes it (the next request reconnects)."""
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            sent = (b"" if body is None
                    else b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
            self.writer.write(f"{method} {target} HTTP/1.1\r\nHost: {self.host}\r\n{self.headers}".encode() + sent
                              + b"\r\n" + (body or b""))
            status = int((await self.reader.readline()).split()[1])
            length, chunked, close = 0, False, False
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                name, value = name.lower(), value.strip().lower()
                if name == "content-length":
                    length = int(value)
                chunked |= name == "transfer-encoding" and "chunked" in value
                close |= name == "connection" and value == "close"  # e.g. HAProxy reloading its config
            if chunked:
                parts = []
                while size := int((await self.reader.readline()).strip(), 16):
                    parts.append((await self.reader.readexactly(size + 2))[:-2])
                await self.reader.readline()
                answer = b"".join(parts)
            else:
                answer = await self.reader.readexactly(length)
            if close:
                self.close()
            return status, answer
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            self.close()
            return 0, b""

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(base: str, path: str, users: list[int], clients: int, max_seconds: float,
               rate: float | None = None) -> tuple[list[float], int, float]:
    """One GET per user in `users` over `clients` connections; returns latencies (ms), errors, seconds."""
    latencies: list[float] = []
    errors = 0
    queue = iter(enumerate(users))
    started = time.perf_counter()
    deadline = started + max_seconds

    async def client() -> None:
        nonlocal errors
        connection = Connection(base)
        for i, user in queue:
            now = time.perf_counter()
            if now > deadline:
                break
            due = started + i / rate if rate else now
            if due > now:
                await asyncio.sleep(due - now)
            if await connection.get(f"{path}?{urlencode({'user_id': user, 'k': 10})}") == 200:
                latencies.append(1000 * (time.perf_counter() - due))
            else:
                errors += 1
        connection.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, errors, time.perf_counter() - started


def run_phase(name: str, base: str, path: str, users: list[int], clients: int, max_seconds: float,
              rate: float | None = None) -> Phase:
    latencies, errors, seconds = asyncio.run(load(base, path, users, clients, max_seconds, rate))
    phase = Phase(name, path, clients, rate, latencies, errors, seconds)
    print(phase.row(), flush=True)
    return phase


def serve_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this run's Ray Serve ingress (its HTTP proxy, or HAProxy and its manager) and replicas
    (the Ray instance is this process's child). Unlike latency, CPU per request hardly moves with what else the
    machine runs."""
    totals = {"ingress": 0.0, "replicas": 0.0}
    for process in psutil.Process().children(recursive=True):
        with suppress(psutil.Error):
            title = " ".join(process.cmdline())
            role = ("ingress" if process.name() == "haproxy" or title.startswith(("ray::ProxyActor", "ray::HAProxy"))
                    else "replicas" if title.startswith("ray::ServeReplica") else None)
            if role:
                times = process.cpu_times()
                totals[role] += times.user + times.system
    return totals


def side_by_side(names: dict[str, str], base: str, users: list[int], clients: int, rounds: int, max_seconds: float,
                 rate: float | None = None) -> list[Phase]:
    """One phase per path of `names` (path -> phase name), run alternately in `rounds` rounds over the same
    users, so that a change in what else the machine runs falls on every path alike; each round's share of
    `max_seconds` bounds it."""
    merged = {path: Phase(name, path, clients, rate, [], 0, 0.0) for path, name in names.items()}
    for part in np.array_split(np.asarray(users), rounds):
        for path, phase in merged.items():
            cpu_before = serve_cpu_seconds()
            latencies, errors, seconds = asyncio.run(load(base, path, part.tolist(), clients, max_seconds / rounds,
                                                          rate))
            for role, spent in serve_cpu_seconds().items():
                phase.cpu_seconds[role] = phase.cpu_seconds.get(role, 0.0) + spent - cpu_before[role]
            phase.latencies_ms += latencies
            phase.errors += errors
            phase.seconds += seconds
    for phase in merged.values():
        print(phase.row(), flush=True)
    return list(merged.values())
