"""The local runtime of `make serve` and the tests: a Ray instance started with the ingress's environment
(`serving.ingress`), serving the application on serve.host:serve.port until the block ends."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray import serve

from ncf import feedback_store
from ncf.config import ServeConfig, load_config
from serving.deployment import APP_NAME, build
from serving.feedback_routes import LOOPBACK
from serving.ingress import haproxy_env, ray_serve_env


@contextmanager
def running(config: ServeConfig, tracking_uri: str, feedback_uri: str | None = None) -> Iterator[str]:
    """A local Ray instance serving the app on config.host:config.port, its model registry at `tracking_uri`, its
    ratings store at `feedback_uri` (default: NCF_FEEDBACK_URI, else conf/feedback.yaml's); yields the base URL,
    then stops both."""
    feedback_uri = feedback_uri or feedback_store.feedback_uri(load_config().feedback)
    with tempfile.TemporaryDirectory(prefix="ncf-serve-") as private:
        env = ray_serve_env(config) | (haproxy_env(private, config.host) if config.ingress == "haproxy" else {})
        # Ray's processes take these from the environment they start in; this process keeps its own.
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            ray.init(address="local", include_dashboard=False, configure_logging=False)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name)
                else:
                    os.environ[name] = value
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
            serve.run(build(config, tracking_uri, feedback_uri, loopback_only=config.host in LOOPBACK), name=APP_NAME,
                      route_prefix="/")
            yield f"http://{config.host}:{config.port}"
        finally:
            serve.shutdown()
            ray.shutdown()
