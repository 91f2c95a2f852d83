"""Builds the GraphQL-backed parts once at start: client, sources, attribution, sync worker.

The entry point calls ``build_remote_actors`` and puts the sources it
returns into the chain in the configured order; nothing here does I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tornado.httpclient import AsyncHTTPClient

from actors.attribution import AttributionSearch
from actors.base import ActorSource
from actors.dotcom_user import DotcomUserSource
from actors.graphql import GraphQLClient
from actors.product_subscriptions import ProductSubscriptionSource
from actors.graphql_source import ResetUsage
from actors.sync_worker import SyncWorker
from conf.model import Config

log = logging.getLogger("gateway.actors")

REMOTE_SOURCES = ("dotcom-user", "product-subscriptions")


@dataclass
class RemoteActors:
    graphql: GraphQLClient | None
    attribution: AttributionSearch
    sources: dict[str, ActorSource] = field(default_factory=dict)

    def source(self, name: str) -> ActorSource | None:
        return self.sources.get(name)


def build_remote_actors(
    config: Config,
    *,
    http_client: AsyncHTTPClient,
    cache_redis: object | None,
    reset_usage: ResetUsage | None,
    version: str,
) -> RemoteActors:
    """The remote sources named in ``actors.sources``; none without a dotcom access token.

    ``cache_redis`` holds the actor caches (None: in-process caches with the
    same semantics); ``reset_usage`` is the limiter's ``reset``.
    """
    actors = config.actors
    if not actors.dotcom_access_token:
        wanted = [name for name in actors.sources if name in REMOTE_SOURCES]
        if wanted:
            log.info("actor sources %s disabled: no CODY_GATEWAY_DOTCOM_ACCESS_TOKEN", ", ".join(wanted))
        return RemoteActors(graphql=None, attribution=AttributionSearch(None, enabled=False))
    graphql = GraphQLClient(
        http_client,
        api_url=actors.dotcom_api_url,
        access_token=actors.dotcom_access_token,
        client_id=actors.dotcom_client_id,
        environment=config.environment,
        version=version,
    )
    sources: dict[str, ActorSource] = {}
    if "dotcom-user" in actors.sources:
        sources["dotcom-user"] = DotcomUserSource(graphql, cache_redis, actors, reset_usage)
    if "product-subscriptions" in actors.sources:
        sources["product-subscriptions"] = ProductSubscriptionSource(graphql, cache_redis, actors, reset_usage)
    log.info(
        "actor sources %s use %s (cache: %s)",
        ", ".join(sources) or "(none)",
        actors.dotcom_api_url,
        "Redis" if cache_redis is not None else "in-process",
    )
    return RemoteActors(
        graphql=graphql,
        attribution=AttributionSearch(graphql, enabled=actors.attribution_enabled),
        sources=sources,
    )


def build_sync_worker(
    sync_all: Callable[[], Awaitable[object]], lock_redis: object | None, config: Config
) -> SyncWorker:
    """The periodic sync (``chain.sync_all``) under the ``source-syncer-worker`` lock."""
    return SyncWorker(sync_all, lock_redis, interval_s=config.actors.sources_sync_interval)
