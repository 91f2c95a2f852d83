"""The composition root: every part built once from the config, and the route table.

``build_gateway`` builds the parts in order (what can refuse the start
first), and ``route_table`` lists every URL with its handler and what that
handler is built from, as Cody Gateway's ``NewHandler`` does. Handlers get
their parts through ``initialize`` keyword arguments; nothing is global.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tornado.web
from tornado.httpclient import AsyncHTTPClient

from abuse.prompt_store import PromptStore
from abuse.screening import make_screening
from actors.anonymous import AnonymousSource
from actors.attribution import AttributionSearch
from actors.base import ActorSource
from actors.chain import SourceChain
from actors.dotcom_user import DotcomUserSource
from actors.graphql import GraphQLClient
from actors.graphql_source import ResetUsage
from actors.product_subscriptions import ProductSubscriptionSource
from actors.static import StaticActorsError, StaticSource
from actors.sync_worker import SyncWorker
from conf.loader import resolve_path
from conf.model import Config
from handlers.actor_sync import SyncAllSourcesHandler
from handlers.attribution import AttributionHandler
from handlers.base import DisabledRouteHandler, NotFoundHandler
from handlers.client_address import TrustedProxies, parse_networks
from handlers.completions import CompletionsHandler
from handlers.diagnostics import HealthHandler, LiveHandler, ReadyHandler, UnknownDiagnosticsHandler, VersionHandler
from handlers.embeddings import EMBEDDINGS_DISABLED, EmbeddingModelsHandler, Embeddings, EmbeddingsHandler, build_embeddings
from handlers.flagged_prompts import FlaggedPromptHandler, FlaggedPromptsHandler
from handlers.leases import LeaseKeeper
from handlers.limits import LimitsHandler, LimitsRefreshHandler
from handlers.metrics import MetricsHandler
from handlers.models import AnthropicModelsHandler, CountTokensHandler, OpenAIModelsHandler
from handlers.openapi import OpenAPIHandler, load_openapi
from handlers.services import Services
from limiter.base import Limiter
from limiter.failover import FailoverLimiter
from limiter.memory import MemoryLimiter
from telemetry.request_telemetry import RequestTelemetry, build_metrics, build_request_telemetry
from telemetry.tracing import Tracing
from upstreams.base import Provider
from upstreams.registry import build_providers, disabled_message
from upstreams.retry import upstream_policy
from upstreams.tokenizer import warm_up
from upstreams.transport import Transport
from usage.logger import EventLogger
from usage.sinks import build_sink

log = logging.getLogger("gateway")


class StartupError(Exception):
    """A start that cannot go on; gateway.py prints the message as one line and exits 2."""


async def build_limiter(config: Config, *, observe_redis: Any = None) -> Limiter:
    if not config.redis.endpoint:
        log.info("limiter: in-process (no REDIS_ENDPOINT)")
        return MemoryLimiter()
    from limiter.redis_limiter import RedisLimiter
    from redisconn.connect import connect

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


REMOTE_SOURCES = ("dotcom-user", "product-subscriptions")


@dataclass
class RemoteActors:
    """What the Sourcegraph-style GraphQL API gives: actor sources and attribution search."""

    attribution: AttributionSearch
    sources: dict[str, ActorSource] = field(default_factory=dict)


def build_remote_actors(
    config: Config, *, http_client: AsyncHTTPClient, cache_redis: object | None, reset_usage: ResetUsage | None, version: str
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
        return RemoteActors(attribution=AttributionSearch(None, enabled=False))
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
    return RemoteActors(attribution=AttributionSearch(graphql, enabled=actors.attribution_enabled), sources=sources)


def build_actor_chain(config: Config, remote: RemoteActors) -> tuple[SourceChain, StaticSource | None]:
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
            static = load_static_actors(config)
            sources.append(static)
        elif name in remote.sources:
            sources.append(remote.sources[name])
    return SourceChain(sources, local_cache_ttl_s=actors.local_cache_ttl), static


def load_static_actors(config: Config) -> StaticSource:
    actors = config.actors
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
    return static


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


Route = tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]


@dataclass(frozen=True)
class Parts:
    """What the route table's handlers are built from, besides ``Services``."""

    providers: dict[str, Provider]
    embeddings: Embeddings | None
    attribution: AttributionSearch
    prompts: PromptStore
    openapi: bytes


def route_table(parts: Parts) -> list[Route]:
    """Every URL the gateway serves, in match order; unknown paths get the JSON 404."""

    def needs(provider: str, route: Route) -> Route:
        """The route while ``provider`` is enabled; else a 404 naming what enables it."""
        return route if provider in parts.providers else (route[0], DisabledRouteHandler, {"message": disabled_message(provider)})

    def provided(path: str, handler: type[tornado.web.RequestHandler], provider: str, **kwargs: Any) -> Route:
        """A route whose handler is built from ``provider``."""
        return needs(provider, (path, handler, {"provider": parts.providers.get(provider), **kwargs}))

    def completions(path: str, provider: str, *, sdk: bool = False) -> Route:
        return provided(path, CompletionsHandler, provider, sdk_route=sdk)

    def embeddings(path: str, handler: type[tornado.web.RequestHandler], **kwargs: Any) -> Route:
        if parts.embeddings is None:
            return (path, DisabledRouteHandler, {"message": EMBEDDINGS_DISABLED})
        return (path, handler, {"embeddings": parts.embeddings, **kwargs})

    return [
        # path                                         handler                   built from
        (r"/-/__version",                              VersionHandler,           {}),
        (r"/-/readyz",                                 ReadyHandler,             {}),
        (r"/-/livez",                                  LiveHandler,              {}),
        (r"/-/healthz",                                HealthHandler,            {}),
        (r"/-/actor/sync-all-sources",                 SyncAllSourcesHandler,    {}),
        (r"/-/flagged-requests",                       FlaggedPromptsHandler,    {"store": parts.prompts}),
        (r"/-/flagged-requests/(.+)",                  FlaggedPromptHandler,     {"store": parts.prompts}),
        (r"/-/.*",                                     UnknownDiagnosticsHandler, {}),
        (r"/metrics",                                  MetricsHandler,           {}),
        (r"/openapi.json",                             OpenAPIHandler,           {"document": parts.openapi}),
        (r"/v1/limits",                                LimitsHandler,            {}),
        (r"/v1/limits/refresh",                        LimitsRefreshHandler,     {}),
        (r"/v1/attribution",                           AttributionHandler,       {"attribution": parts.attribution}),
        completions(r"/v1/completions/anthropic",          "anthropic"),
        completions(r"/v1/completions/anthropic-messages", "anthropic-messages"),
        completions(r"/v1/completions/openai",             "openai"),
        completions(r"/v1/completions/fireworks",          "fireworks"),
        completions(r"/v1/completions/google",             "google"),
        embeddings(r"/v1/embeddings",                  EmbeddingsHandler),
        embeddings(r"/v1/embeddings/models",           EmbeddingModelsHandler),
        # The official SDKs' routes (base_url <gateway>/anthropic and <gateway>/openai/v1).
        completions(r"/anthropic/v1/messages",             "anthropic-messages", sdk=True),
        provided(r"/anthropic/v1/messages/count_tokens",   CountTokensHandler,      "anthropic-messages"),
        provided(r"/anthropic/v1/models",                  AnthropicModelsHandler,  "anthropic-messages"),
        provided(r"/anthropic/v1/models/([^/]+)",          AnthropicModelsHandler,  "anthropic-messages"),
        completions(r"/openai/v1/chat/completions",        "openai", sdk=True),
        needs("openai", (r"/openai/v1/models",             OpenAIModelsHandler,      {})),
        embeddings(r"/openai/v1/embeddings",           EmbeddingsHandler,        sdk_route=True),
    ]  # fmt: skip


def make_application(services: Services, routes: list[Route]) -> tornado.web.Application:
    return tornado.web.Application(
        [(pattern, handler, {"services": services, **kwargs}) for pattern, handler, kwargs in routes],
        default_handler_class=NotFoundHandler,
        default_handler_args={"services": services},
        compress_response=False,
        log_function=lambda handler: None,
    )


@dataclass
class Gateway:
    """Everything one gateway process runs, built once; ``close`` undoes it in order."""

    services: Services
    app: tornado.web.Application
    http_client: AsyncHTTPClient
    static_source: StaticSource | None
    sync_worker: SyncWorker | None
    redis_clients: list[Any]
    telemetry: RequestTelemetry

    async def close(self, *, events_timeout_s: float = 10.0) -> None:
        services = self.services
        if self.sync_worker is not None:
            await self.sync_worker.stop()
        services.leases.stop()
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
        chain, static_source = build_actor_chain(config, remote)
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
        leases=LeaseKeeper(limiter, config.upstream.lease_ttl_s),
        trusted_proxies=proxies,
        version=version,
    )
    services.leases.start()
    attach_health_and_breaker(services)
    screening = services.screening = make_screening(config, lock_redis)
    request_telemetry = build_request_telemetry(
        services, metrics=metrics, http_client=http_client, redis=notify_redis or lock_redis
    )
    parts = Parts(
        providers=build_providers(config),
        embeddings=build_embeddings(services),
        attribution=remote.attribution,
        prompts=screening.store,
        openapi=load_openapi(),
    )
    # Test routes go first, so a test can stand in front of any route.
    routes = list(extra_routes or []) + route_table(parts)
    sync_worker = None
    if remote.sources:
        # The periodic sync of every subscription, under the ``source-syncer-worker`` lock.
        sync_worker = SyncWorker(chain.sync_all, lock_redis, interval_s=config.actors.sources_sync_interval)
        sync_worker.start()
    redis_clients = list({id(c): c for c in (cache_redis, lock_redis) if c is not None}.values())
    return Gateway(
        services=services,
        app=make_application(services, routes),
        http_client=http_client,
        static_source=static_source,
        sync_worker=sync_worker,
        redis_clients=redis_clients,
        telemetry=request_telemetry,
    )
