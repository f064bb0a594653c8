"""The replica answering a request, as every handler finds it."""

from __future__ import annotations

from typing import Any

from ray import serve


def current_replica() -> Any:
    """The replica answering this request: the `serving.deployment.RecommenderDeployment` whose model version
    (`served`), config (`config`) and ratings store (`store()`) the handlers read."""
    return serve.get_replica_context().servable_object
