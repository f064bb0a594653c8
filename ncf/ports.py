"""Loopback ports for what this project starts (a private Ray cluster's dashboard, a served app, test services)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port nobody listens on now (others share this machine: never assume a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
