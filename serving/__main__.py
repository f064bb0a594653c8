"""`make serve`: the API and web page on conf/serve.yaml's host:port, in the foreground.

    python -m serving [--set serve.key=value ...]

Ctrl-C or SIGTERM stops Serve and the local Ray instance it started.
"""

from __future__ import annotations

import signal
import sys
import threading

from mlflow import MlflowClient

from ncf.config import load_config, override_parser
from ncf.integrations import mlflow_tracking
from serving.model_version import ModelNotFoundError, resolve_version
from serving.runtime import running


def main(argv: list[str] | None = None) -> int:
    args = override_parser(__doc__.splitlines()[0]).parse_args(argv)
    config = load_config(args.overrides).serve
    uri = mlflow_tracking.tracking_uri()
    try:
        version = resolve_version(config.model_uri, MlflowClient(uri, uri))
    except ModelNotFoundError as err:
        print(f"{err}\nstore: {uri}\nTrain and register a model first: `make train` "
              "(its first model becomes the champion), or point MLFLOW_TRACKING_URI at a store that has one.",
              file=sys.stderr)
        return 1
    with running(config, uri) as url:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
            signal.signal(sig, lambda *_: stop.set())
        print(f"serving {version.name} version {version.version} at {url}/ (API docs: {url}/docs); "
              "Ctrl-C stops it", flush=True)
        stop.wait()
        print("stopping ...", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
