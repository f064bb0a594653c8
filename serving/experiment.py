"""The online experiment inside a replica: which version answers each user (`Variants`), the record of the lists
served (`ServedListLog`), and the periodic work one replica does per period (`experiment_period`): log the metrics
to MLflow, and with serve.experiment.auto_promote decide.

While no experiment runs, nothing here touches the request path beyond one attribute read: /recommend stays as
fast as without experiments.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from mlflow import MlflowClient

from ncf.experiment import CHALLENGER, CHAMPION, ExperimentConfig, ServedList, Variant, experiment_id, variant_of
from ncf.feedback_store import RatingsStore
from ncf.integrations import experiments
from ncf.online_metrics import ready
from serving.model_version import Ranking, ServedVersion

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True, eq=False)
class Variants:
    """The model versions a replica serves now: the champion, and during an experiment the challenger. Replaced as a
    whole whenever either changes, so its identity names what answers (the replayed answers start afresh with it)."""

    champion: ServedVersion
    challenger: ServedVersion | None
    config: ExperimentConfig
    id: str | None = field(init=False)  # the experiment's id; None: no experiment runs

    def __post_init__(self) -> None:
        running = self.challenger is not None
        object.__setattr__(self, "id", experiment_id(self.champion.version, self.challenger.version)
                           if running else None)

    def for_user(self, user_id: int) -> tuple[Variant, ServedVersion]:
        """The variant that answers the user, and its version: the challenger for the users the split assigns it
        (sticky: a hash of the experiment and the user), the champion for the others and in shadow mode."""
        if self.id is None or self.config.mode == "shadow" or variant_of(self.id, user_id, self.config.share) \
                == CHAMPION:
            return CHAMPION, self.champion
        return CHALLENGER, self.challenger

    @property
    def versions(self) -> dict[str, str]:
        return {CHAMPION: self.champion.version, CHALLENGER: self.challenger.version if self.challenger else ""}


def movie_ids(served: ServedVersion, ranking: Ranking, k: int) -> tuple[int, ...]:
    return tuple(served.recommender.ids.movie_ids[np.asarray(ranking.movies[:k], dtype=np.int64)].tolist())


class ServedListLog:
    """The lists a replica served during an experiment, on their way to the ratings store: `add` appends on the
    request path; `run` writes them every FLUSH_S seconds in one transaction (insert-or-ignore: a replayed or
    repeated answer counts once). Off the request path, so a store that is slow or down never delays an answer; it
    holds at most MAX_PENDING lists meanwhile, dropping the oldest beyond. What a crash loses is the lists not
    written yet: online metrics only (a rating posted with such a list's rec_id goes unattributed); ratings are
    acknowledged only once committed to their own table, never through this buffer.

    In shadow mode `shadow` computes the challenger's list beside the champion's shown one, in a task of its own
    (at most MAX_SHADOW at once; beyond, a shadow list is skipped), and records it with the shown list's rec_id."""

    FLUSH_S = 1.0
    MAX_PENDING = 100_000
    MAX_SHADOW = 8

    def __init__(self, store: Callable[[], RatingsStore]):
        self.store = store
        self.pending: list[ServedList] = []
        self.shadows: set[asyncio.Task] = set()

    def add(self, variants: Variants, variant: Variant, served: ServedVersion, user_id: int, ranking: Ranking,
            k: int, stamp: int, shown_rec_id: str | None = None) -> str:
        """Record one list; returns its rec_id."""
        rec_id = served.rec_id(user_id, stamp, k)
        self.pending.append(ServedList(variants.id, rec_id, variant, served.version, user_id,
                                       movie_ids(served, ranking, k), time.time(), shown_rec_id))
        if len(self.pending) > self.MAX_PENDING:
            del self.pending[:len(self.pending) - self.MAX_PENDING]
        return rec_id

    def shadow(self, variants: Variants, user_id: int, k: int, shown_rec_id: str,
               ranking: Callable[[ServedVersion], Awaitable[tuple[Ranking, int, bool]]]) -> None:
        """Compute and record the challenger's list for a request the champion answered (`ranking(version)`: the
        user's ranking by a version, with the live rating stamp it was computed as of)."""
        if len(self.shadows) >= self.MAX_SHADOW:
            return

        async def compute() -> None:
            try:
                ranked, stamp, _ = await ranking(variants.challenger)
                self.add(variants, CHALLENGER, variants.challenger, user_id, ranked, k, stamp, shown_rec_id)
            except Exception as err:  # metrics only: the answer has gone already
                logger.warning("shadow list of user %d not computed: %s", user_id, err)

        task = asyncio.get_running_loop().create_task(compute())
        self.shadows.add(task)
        task.add_done_callback(self.shadows.discard)

    def flush(self) -> None:
        """Write what is pending (in a thread: the store may be a network away); on failure keep it for later."""
        batch, self.pending = self.pending, []
        try:
            self.store().add_served_lists(batch)
        except Exception as err:
            logger.warning("%d served list(s) not recorded yet: %s", len(batch), err)
            self.pending[:0] = batch[-self.MAX_PENDING:]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_S)
            if self.pending:
                await asyncio.to_thread(self.flush)


def experiment_period(variants: Variants, store: RatingsStore, client: MlflowClient) -> None:
    """One period's work of the experiment, by the one replica that claims it in the store: log the online
    metrics to the experiment's MLflow runs and, with serve.experiment.auto_promote, decide once both variants
    served serve.experiment.min_lists lists (`ncf.integrations.experiments.promote_on_evidence`)."""
    config = variants.config
    if not store.claim(variants.id, int(time.time() // config.log_interval_s)):
        return
    running = experiments.running_experiment(variants.champion.name, client)
    if running is None or running.id != variants.id:
        return  # the aliases moved: the next poll ends or changes the experiment
    catalogue = variants.champion.recommender.ids.n_movies
    metrics = experiments.online_metrics(running, store, config, catalogue)
    if config.auto_promote and ready(metrics, config.min_lists):  # the decision logs the metrics it decided on
        experiments.promote_on_evidence(variants.champion.name, store, config, client, catalogue, running)
    else:
        experiments.log_online_metrics(running, metrics, int(time.time() // config.log_interval_s), client)
