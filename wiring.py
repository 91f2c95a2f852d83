"""Builds the gateway's parts from the configuration (called once from gateway.serve).

Kept apart from gateway.py so the entry point stays a thin sequence and
each part's construction is in one readable place.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.web
from tornado.httpclient import AsyncHTTPClient

from actors.anonymous import AnonymousSource
from actors.base import ActorSource
from actors.chain import SourceChain
from actors.remote_setup import REMOTE_SOURCES, RemoteActors
from actors.static import StaticActorsError, StaticSource
from conf.loader import resolve_path
from conf.model import Config
from handlers.client_address import TrustedProxies, parse_networks
from handlers.services import Services
from limiter.base import Limiter
from limiter.memory import MemoryLimiter
from limiter.failover import FailoverLimiter
from telemetry.request_telemetry import RequestTelemetry, build_metrics, build_request_telemetry
from usage.logger import EventLogger
from usage.sinks import build_sink

log = logging.getLogger("gateway")


class StartupError(Exception):
    """A start that cannot go on; gateway.py prints the message as one line and exits 2."""


async def build_limiter(config: Config, *, observe_redis: Any = None) -> Limiter:
    if not config.redis.endpoint:
        log.info("limiter: in-process (no REDIS_ENDPOINT)")
        return MemoryLimiter()
    from redisconn.connect import connect
    from limiter.redis_limiter import RedisLimiter

    client = connect(
        config.redis.endpoint, timeout_ms=config.redis.timeout_ms, max_connections=config.redis.max_connections
    )
    log.info("limiter: Redis, failure policy %s", config.redis.failure_policy)
    primary = RedisLimiter(client, owns_client=True)
    try:
        await asyncio.wait_for(primary.load_scripts(), max(1.0, config.redis.timeout_ms / 1000 * 4))
    except Exception as exc:  # Redis may be down at start; the failover policy covers it
        if config.redis.failure_policy == "fail_closed":
            await primary.close()
            raise StartupError(
                f"Redis at the configured redis.endpoint is unreachable and redis.failure_policy is fail_closed: "
                f"{exc or type(exc).__name__}"
            ) from exc
        log.warning("could not preload limiter scripts: %s", exc)
    return FailoverLimiter(
        primary,
        MemoryLimiter(),
        policy=config.redis.failure_policy,
        timeout_s=config.redis.timeout_ms / 1000,
        observe=observe_redis,
    )


def build_event_logger(config: Config) -> EventLogger:
    sink = build_sink(config.events, config.base_dir)
    log.info("usage events: %s sink", sink.name)
    return EventLogger(config.events, sink, base_dir=config.base_dir)


def connect_actor_redis(config: Config) -> tuple[Any | None, Any | None]:
    """(cache client, lock client): the actor caches use REDIS_CACHE_ENDPOINT when set, else REDIS_ENDPOINT."""
    from redisconn.connect import connect

    def client(endpoint: str) -> Any | None:
        if not endpoint:
            return None
        return connect(endpoint, timeout_ms=config.redis.timeout_ms, max_connections=config.redis.max_connections)

    lock = client(config.redis.endpoint)
    cache = client(config.redis.cache_endpoint) if config.redis.cache_endpoint else lock
    return cache, lock


def build_actor_chain(
    config: Config, *, limiter: Limiter, http_client: AsyncHTTPClient, remote: RemoteActors | None = None
) -> tuple[SourceChain, StaticSource | None]:
    actors = config.actors
    sources: list[ActorSource] = []
    static: StaticSource | None = None
    for name in actors.sources:
        if name == "anonymous":
            sources.append(
                AnonymousSource(
                    allow_anonymous=actors.allow_anonymous,
                    concurrency_percentage=actors.concurrency_limit_percentage,
                    concurrency_interval_s=actors.concurrency_limit_interval,
                )
            )
        elif name == "static":
            path = Path(resolve_path(config, actors.static_file))
            static = StaticSource(
                path,
                concurrency_percentage=actors.concurrency_limit_percentage,
                concurrency_interval_s=actors.concurrency_limit_interval,
            )
            if not path.exists() and not actors.static_file_optional:
                raise StartupError(
                    f"static actors file {path} does not exist (actors.static_file, CODY_GATEWAY_STATIC_ACTORS_FILE; "
                    "set actors.static_file_optional = true to start without it)"
                )
            try:
                static.load_initial()
            except StaticActorsError as exc:
                raise StartupError(f"static actors file {path} is invalid: {exc}") from exc
            except OSError as exc:
                raise StartupError(f"static actors file {path} cannot be read: {exc.strerror or exc}") from exc
            sources.append(static)
        elif name in REMOTE_SOURCES:
            source = remote.source(name) if remote is not None else None
            if source is not None:
                sources.append(source)
    return SourceChain(sources, local_cache_ttl_s=actors.local_cache_ttl), static


def trusted_proxies(config: Config) -> TrustedProxies:
    try:
        return TrustedProxies(parse_networks(config.server.trusted_proxies))
    except ValueError as exc:
        raise StartupError(f"server.trusted_proxies: {exc}") from exc


def attach_health_and_breaker(services: Services) -> None:
    """Health probes (event sink, Redis or the in-process limiter, circuits) and the circuit breaker."""
    from upstreams.circuit import CircuitBreaker

    events = services.events
    probes = services.health_probes

    async def events_probe() -> dict[str, Any]:
        stats = events.stats() if isinstance(events, EventLogger) else {}
        healthy = events.healthy if isinstance(events, EventLogger) else True
        return {"ok": healthy, **stats}

    probes["events"] = events_probe
    limiter = services.limiter
    if isinstance(limiter, FailoverLimiter):
        probes["redis"] = limiter.health
    else:

        async def memory_probe() -> dict[str, Any]:
            return {"ok": True, "limiter": "in-process"}

        probes["limiter"] = memory_probe
    breaker = services.circuit_breaker = CircuitBreaker(services.config.upstream)
    probes["circuits"] = breaker.health_probe


@dataclass
class Gateway:
    """Everything one gateway process runs, built once; ``close`` undoes it in order."""

    services: Services
    app: tornado.web.Application
    http_client: AsyncHTTPClient
    static_source: StaticSource | None
    sync_worker: Any | None
    redis_clients: list[Any]
    telemetry: RequestTelemetry

    async def close(self, *, events_timeout_s: float = 10.0) -> None:
        services = self.services
        if self.sync_worker is not None:
            await self.sync_worker.stop()
        for hook in services.shutdown_hooks:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        events = services.events
        if isinstance(events, EventLogger):
            await events.stop(timeout_s=events_timeout_s)
        await services.limiter.close()
        for client in self.redis_clients:
            await client.aclose()
        await services.tracing.aclose()
        services.tracing.shutdown()


async def build_gateway(
    config: Config,
    *,
    version: str,
    span_processors: list[Any] | None = None,
    notify_redis: Any | None = None,
    extra_routes: list[Any] | None = None,
) -> Gateway:
    """Build the gateway's parts from the config, on the running loop.

    ``span_processors``, ``notify_redis`` and ``extra_routes`` let in-process
    tests watch spans, send quota notifications through a Redis of their own
    and add routes of their own.
    """
    from abuse.screening import make_screening
    from actors.remote_setup import build_remote_actors, build_sync_worker
    from handlers.actor_sync import SyncAllSourcesHandler
    from handlers.app import make_app
    from handlers.attribution import attribution_routes
    from handlers.flagged_prompts import FlaggedPromptHandler, FlaggedPromptsHandler
    from telemetry.tracing import Tracing
    from upstreams.retry import upstream_policy
    from upstreams.tokenizer import warm_up
    from upstreams.transport import Transport

    AsyncHTTPClient.configure(
        "tornado.curl_httpclient.CurlAsyncHTTPClient",
        max_clients=config.upstream.max_clients,
        max_body_size=1 << 40,
    )
    http_client = AsyncHTTPClient()
    warm_up()

    metrics = build_metrics(config, version)
    # What can refuse the start (Redis under fail_closed, the actors file) comes
    # first, before anything that runs in the background is started.
    proxies = trusted_proxies(config)
    limiter = await build_limiter(config, observe_redis=metrics.redis_call)
    cache_redis, lock_redis = connect_actor_redis(config)
    remote = build_remote_actors(
        config, http_client=http_client, cache_redis=cache_redis, reset_usage=limiter.reset, version=version
    )
    try:
        chain, static_source = build_actor_chain(config, limiter=limiter, http_client=http_client, remote=remote)
    except StartupError:
        await limiter.close()
        for client in {id(c): c for c in (cache_redis, lock_redis) if c is not None}.values():
            await client.aclose()
        raise
    events = build_event_logger(config)
    events.start()
    tracing = Tracing(config.telemetry, version=version, extra_processors=span_processors)
    services = Services(
        config=config,
        actors=chain,
        limiter=limiter,
        events=events,
        transport=Transport(http_client, config.upstream),
        tracing=tracing,
        retry_policy=upstream_policy(config.upstream),
        trusted_proxies=proxies,
        version=version,
    )
    attach_health_and_breaker(services)
    screening = services.screening = make_screening(config, lock_redis)
    request_telemetry = build_request_telemetry(
        services, metrics=metrics, http_client=http_client, redis=notify_redis or lock_redis
    )
    routes = list(extra_routes or [])
    routes += [
        (r"/-/flagged-requests", FlaggedPromptsHandler, {"store": screening.store}),
        (r"/-/flagged-requests/(.+)", FlaggedPromptHandler, {"store": screening.store}),
    ]
    routes += attribution_routes(remote.attribution)
    routes.append((r"/-/actor/sync-all-sources", SyncAllSourcesHandler, {}))
    sync_worker = None
    if remote.sources:
        sync_worker = build_sync_worker(chain.sync_all, lock_redis, config)
        sync_worker.start()
    redis_clients = list({id(c): c for c in (cache_redis, lock_redis) if c is not None}.values())
    return Gateway(
        services=services,
        app=make_app(services, routes),
        http_client=http_client,
        static_source=static_source,
        sync_worker=sync_worker,
        redis_clients=redis_clients,
        telemetry=request_telemetry,
    )
