"""`make promote`: decide the online experiment now, from the ratings store's evidence.

    python -m jobs.promote [--set serve.experiment.margin=0.02 ...]

The experiment is the one serve.model_uri's registered model runs (its `challenger` alias beside `champion`). Its
online metrics are computed from the lists served and the ratings posted with their rec_ids (the figures GET
/experiment shows); the challenger is promoted (`champion` moves to it, `challenger` is deleted) only when its
version passed the offline gate (tag challenger.offline_gate=passed) and the one-sided 95% lower bound of its
positive rate minus the champion's is >= -serve.experiment.margin; otherwise `challenger` is deleted (rollback).
The decision and its figures are tagged on both versions and on the experiment's MLflow run. Serve follows both
aliases: no request fails during either move. Exit status 0 after a decision or when no experiment runs.
"""

from __future__ import annotations

import re
import sys

from mlflow import MlflowClient

from ncf.config import MODEL_URI, load_config, override_parser
from ncf.feedback_store import RatingsStore, feedback_uri
from ncf.integrations import experiments, mlflow_tracking


def main(argv: list[str] | None = None) -> int:
    args = override_parser(__doc__.splitlines()[0]).parse_args(argv)
    config = load_config(args.overrides, preset=args.preset)
    name = re.match(MODEL_URI, config.serve.model_uri)["name"]
    uri = mlflow_tracking.tracking_uri()
    store = RatingsStore(feedback_uri(config.feedback))
    try:
        outcome = experiments.promote_on_evidence(name, store, config.serve.experiment, MlflowClient(uri, uri))
    finally:
        store.close()
    if outcome is None:
        print(f"no experiment runs on {name}: its {experiments.CHALLENGER} alias is not set beside champion")
        return 0
    m = outcome.metrics
    for v in (m.champion, m.challenger):
        print(f"{v.variant:10} v{v.model_version}: {v.lists_served} lists, {v.ratings_attributed} ratings, positive "
              f"rate {v.positive_rate.estimate:.4f} [{v.positive_rate.low:.4f}, {v.positive_rate.high:.4f}]")
    d = m.positive_rate_difference
    print(f"difference {d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}], one-sided lower bound "
          f"{m.positive_rate_difference_lower:+.4f}")
    print(f"experiment {m.experiment_id}: {outcome.decision.action} ({outcome.decision.reason}); MLflow run "
          f"{outcome.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
