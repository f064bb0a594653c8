"""The Ray Serve deployment of the recommender, and the application built from conf/serve.yaml.

`RecommenderDeployment` answers from the model version `serve.model_uri` names (`serving.model_version`) and,
while an online experiment runs, from the same model's `challenger` version for the users the experiment sends
there (`serving.experiment`). It polls both aliases and swaps in each new version once it is loaded and warmed, so
no request waits for an update or fails on one; a promoted challenger, loaded already, becomes the champion as it
is. /recommend answers from a per-version cache of each user's top-100 unseen movies; a user not cached yet is
scored at once when alone, else together with the others, one catalogue pass per batch (`@serve.batch`). Its ASGI
app is the HTTP API (`serving.routes.api`) behind the replayed answers (`serving.answer_cache`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from ray import serve
from ray.serve import Application

from ncf import feedback_store
from ncf.config import ServeConfig, load_config
from ncf.experiment import CHALLENGER
from ncf.feedback_store import LiveRating, RatingsStore
from ncf.integrations import experiments, mlflow_tracking
from serving.answer_cache import ReplayedAnswers
from serving.experiment import ServedListLog, Variants, experiment_period
from serving.model_version import Ranking, ServedVersion, load_version, resolve_version
from serving.replica import current_replica
from serving.routes import api

# The names Ray Serve knows the app and its deployment by: `serve status`, the replicas' actor names
# (SERVE_REPLICA::<app>#<deployment>#<id>), the `application` and `deployment` labels of Serve's metrics, and the
# `name` of the application in serving/serve_config.yaml and the RayService.
APP_NAME = "ncf"
DEPLOYMENT_NAME = "Recommendations"
logger = logging.getLogger("ray.serve")


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(ReplayedAnswers(api, current_replica))
class RecommenderDeployment:
    """A replica: the HTTP API (`api`) behind its replayed answers (`app`), answering from this replica's model
    versions (`variants`; `served`: the champion's)."""

    async def __init__(self, settings: dict, tracking_uri: str, feedback_uri: str, loopback_only: bool):
        self.config = ServeConfig.model_validate(settings)
        # Writes (serving.feedback_routes) need this bearer token when it is set or when the app may be reached
        # from beyond loopback (`loopback_only` false).
        self.api_token = os.environ.get("NCF_API_TOKEN") or None
        self.loopback_only = loopback_only
        self.feedback_uri = feedback_uri
        self._store: RatingsStore | None = None
        self._store_lock = threading.Lock()
        torch.set_num_threads(max(1, int(self.config.cpus_per_replica)))
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri, tracking_uri)
        self._ranked.set_max_batch_size(self.config.max_batch_size)
        self._ranked.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self._misses = 0  # requests waiting for a ranking in this replica now
        self.served_lists = ServedListLog(self.store)
        self._broken: set[str] = set()  # versions that failed to load: not tried again
        champion, challenger = await asyncio.to_thread(self._resolve)
        loaded = await asyncio.to_thread(load_version, champion, self.config.cache_users)
        self.variants = Variants(loaded, None, self.config.experiment)
        # The challenger before the first answer, so that no user of its side is ever answered by the champion.
        self.variants = await self._variants(champion, challenger, warm=False) or self.variants
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self.served_lists.run()),
                       loop.create_task(self._experiment_work())]

    @property
    def served(self) -> ServedVersion:
        """The champion's version: what answers every request but a challenger's users' during an experiment."""
        return self.variants.champion

    def _resolve(self) -> tuple[ModelVersion, ModelVersion | None]:
        """The versions serve.model_uri and, when it follows an alias, the same model's `challenger` alias name."""
        champion = resolve_version(self.config.model_uri, self.client)
        if "@" not in self.config.model_uri:  # a pinned version: no experiment
            return champion, None
        return champion, experiments.alias_version(champion.name, CHALLENGER, self.client)

    async def _follow(self) -> None:
        """Warm the served versions, then follow the aliases: swap in each new champion or challenger once it is
        loaded and warmed (a version loaded already, the challenger promoted, is taken as it is)."""
        for version in (self.variants.champion, self.variants.challenger):
            if version is not None:
                await asyncio.to_thread(version.warm, self.config.warm_users)
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                champion, challenger = await asyncio.to_thread(self._resolve)
            except Exception as err:  # the store may be briefly unreachable: keep serving, ask again
                logger.warning("could not resolve %s: %s", self.config.model_uri, err)
                continue
            self.variants = await self._variants(champion, challenger) or self.variants

    async def _variants(self, champion: ModelVersion, challenger: ModelVersion | None,
                        warm: bool = True) -> Variants | None:
        """The variants the registry's versions make, reusing those loaded; None: nothing changes (the same
        versions, or a new champion that failed to load). A challenger that fails to load runs no experiment."""
        now = self.variants
        loaded = {v.version: v for v in (now.champion, now.challenger) if v is not None}
        wanted = [str(champion.version)]
        if challenger is not None and str(challenger.version) != wanted[0]:
            wanted.append(str(challenger.version))
        if wanted == [v.version for v in (now.champion, now.challenger) if v is not None]:
            return None
        for version in (champion, challenger)[:len(wanted)]:
            key = str(version.version)
            if key in loaded or key in self._broken:
                continue
            try:
                new = await asyncio.to_thread(load_version, version, self.config.cache_users)
                if warm:
                    await asyncio.to_thread(new.warm, self.config.warm_users)
                loaded[key] = new
            except Exception:
                logger.exception("could not load %s version %s; still serving version %s",
                                 version.name, key, now.champion.version)
                self._broken.add(key)
        if wanted[0] not in loaded:
            return None
        new = Variants(loaded[wanted[0]], loaded.get(wanted[1]) if len(wanted) > 1 else None, self.config.experiment)
        if new.champion is now.champion and new.challenger is now.challenger:
            return None
        logger.info("now serving %s version %s%s", new.champion.name, new.champion.version,
                    f", experiment {new.id} ({self.config.experiment.mode})" if new.id else "")
        return new

    async def _experiment_work(self) -> None:
        """Every serve.experiment.log_interval_s during an experiment: this period's work, when this replica is the
        one to claim it (`serving.experiment.experiment_period`)."""
        while True:
            await asyncio.sleep(self.config.experiment.log_interval_s)
            variants = self.variants
            if variants.id is None:
                continue
            try:
                await asyncio.to_thread(self.served_lists.flush)
                await asyncio.to_thread(experiment_period, variants, self.store(), self.client)
            except Exception:  # the store or MLflow away: the next period tries again
                logger.exception("experiment %s: this period's logging failed", variants.id)

    @serve.batch  # batch size and wait come from the config, set in __init__
    async def _ranked(self, requests: list[tuple[ServedVersion, int]]) -> list[Ranking]:
        """Rankings of users not cached yet: one catalogue pass per model version in the batch."""
        users: dict[ServedVersion, list[int]] = {}
        for served, user in requests:
            users.setdefault(served, []).append(user)
        ranked = {served: await asyncio.to_thread(served.rank, todo) for served, todo in users.items()}
        return [ranked[served][user] for served, user in requests]

    def store(self) -> RatingsStore:
        """The ratings store, opened at its first use: a store down when the replica starts is asked again at each
        request (StoreUnavailable meanwhile) rather than failing the replica."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = RatingsStore(self.feedback_uri)
        return self._store

    def live_ratings_now(self, user_id: int) -> list[LiveRating]:
        """The user's live ratings, oldest first, that ranking reads: none with serve.live_updates false."""
        return self.store().ratings_of(user_id) if self.config.live_updates else []

    async def live_ratings(self, user_id: int) -> list[LiveRating]:
        """`live_ratings_now` off the event loop (the store may be a network away)."""
        return await asyncio.to_thread(self.live_ratings_now, user_id) if self.config.live_updates else []

    async def live_stamp(self, user_id: int) -> int:
        """The sequence number of the user's latest live rating that ranking reads (0: none)."""
        return await asyncio.to_thread(lambda: self.store().stamp(user_id)) if self.config.live_updates else 0

    async def ranking(self, served: ServedVersion, user_id: int, live: list[LiveRating]) -> tuple[Ranking, int, bool]:
        """The user's ranking by `served` as of their live ratings `live`: the ranking, the sequence number of
        their latest live rating (0: none) and whether it is the cold-start answer."""
        if live:
            state = served.cached_live(user_id, live[-1].seq) or await asyncio.to_thread(served.live_user, user_id,
                                                                                          live)
            return state.ranking, live[-1].seq, False
        user = served.recommender.user_index(user_id)
        cached = served.cold if user is None else served.cached(user)
        return cached or await self.rank_miss(served, user), 0, user is None

    async def rank_miss(self, served: ServedVersion, user: int) -> Ranking:
        """The ranking of a user not cached yet: at once when no other is being ranked (batching would only add
        its wait), else batched with the others (`_ranked`)."""
        self._misses += 1
        try:
            if self._misses == 1:
                return (await asyncio.to_thread(served.rank, [user]))[user]
            return await self._ranked((served, user))
        finally:
            self._misses -= 1


def build(config: ServeConfig, tracking_uri: str, feedback_uri: str, loopback_only: bool) -> Application:
    """The application with its replicas, autoscaling and batching from `config`, its model registry at
    `tracking_uri` and its ratings store at `feedback_uri`; `loopback_only`: whether it is reached from loopback
    only (else writes need NCF_API_TOKEN)."""
    return RecommenderDeployment.options(
        autoscaling_config={"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                            "target_ongoing_requests": config.target_ongoing_requests},
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.cpus_per_replica},
    ).bind(config.model_dump(), tracking_uri, feedback_uri, loopback_only)


def build_app(args: dict) -> Application:
    """`serve deploy serving/serve_config.yaml`: conf/serve.yaml, any key overridable in the YAML's `args`.

    `tracking_uri` (default: MLFLOW_TRACKING_URI, else the project's store) says where the model registry is;
    `feedback_uri` (default: NCF_FEEDBACK_URI, else conf/feedback.yaml's) where the ratings store is. The app
    cannot see the address Serve's HTTP options give it, so it takes writes only with NCF_API_TOKEN.
    """
    args = dict(args)
    config = load_config()
    tracking_uri = args.pop("tracking_uri", None) or mlflow_tracking.tracking_uri()
    store_uri = args.pop("feedback_uri", None) or feedback_store.feedback_uri(config.feedback)
    return build(ServeConfig.model_validate(config.serve.model_dump() | args), tracking_uri, store_uri,
                 loopback_only=False)
