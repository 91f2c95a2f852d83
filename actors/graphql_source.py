"""Pieces shared by the two GraphQL-backed sources (dotcom-user, product-subscriptions)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

from actors.base import ActorRecentlyUpdated, InvalidTokenFormat, NotFromSource, SourceUnavailable
from actors.limits import percentage_concurrency
from actors.model import FEATURES, Actor, RateLimit
from actors.redis_cache import ActorCache, make_actor_cache, token_key
from actors.tokens import TOKEN_LENGTH
from conf.model import ActorsConfig

log = logging.getLogger("gateway.actors.graphql_source")

# The reference's maybeResetUsageData hook: forget (actor id, feature) usage.
ResetUsage = Callable[[str, str], Awaitable[None]]

# Negative entries (token not found) are re-checked at least this often,
# whatever the cache TTL, so a token that becomes valid is not locked out for a day.
NEGATIVE_TTL_S = 15 * 60.0
# After an outage is seen, stale actors are served without calling the API
# again for this long, so a dead service costs one timeout, not one per request.
OUTAGE_SKIP_S = 5.0

# GraphQL rate-limit field per feature.
GRAPHQL_LIMIT_FIELDS: Mapping[str, str] = {
    "chat_completions": "chatCompletionsRateLimit",
    "code_completions": "codeCompletionsRateLimit",
    "embeddings": "embeddingsRateLimit",
}

RATE_LIMIT_FIELDS = "allowedModels source limit intervalSeconds"
ACCESS_FIELDS = (
    "codyGatewayAccess { enabled"
    f" chatCompletionsRateLimit {{ {RATE_LIMIT_FIELDS} }}"
    f" codeCompletionsRateLimit {{ {RATE_LIMIT_FIELDS} }}"
    f" embeddingsRateLimit {{ {RATE_LIMIT_FIELDS} }} }}"
)


class CorruptEntry(Exception):
    pass


def decode_actor(raw: bytes) -> Actor:
    """A cached actor; CorruptEntry for anything that is not one."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise CorruptEntry("not an object")
        return Actor.from_json(data)
    except CorruptEntry:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise CorruptEntry(str(exc)) from exc


def encode_actor(actor: Actor) -> bytes:
    return json.dumps(actor.to_json(), separators=(",", ":")).encode()


def graphql_rate_limit(
    spec: Any,
    *,
    allowed_models: tuple[str, ...] | None,
    percentage: float,
    concurrency_interval_s: float,
) -> RateLimit | None:
    """A RateLimit with percentage concurrency from a GraphQL rate-limit object (None if absent)."""
    if not isinstance(spec, Mapping):
        return None
    try:
        limit = int(spec.get("limit") or 0)
        interval = float(spec.get("intervalSeconds") or 0)
    except (TypeError, ValueError):
        return None
    models = allowed_models
    if models is None:
        raw = spec.get("allowedModels") or ()
        models = tuple(str(m) for m in raw) if isinstance(raw, (list, tuple)) else ()
    return RateLimit(
        allowed_models=models,
        limit=limit,
        interval_s=interval,
        concurrent_requests=percentage_concurrency(limit, interval, percentage),
        concurrent_interval_s=concurrency_interval_s,
    )


def changed_features(old: Actor | None, new: Actor, *, reset_without_old: bool) -> list[str]:
    """Features whose usage should be forgotten after ``new`` replaced ``old``.

    The reference's maybeResetUsageData: only features with a valid new limit
    count. With no comparable old actor (none, empty, or another id) that is
    every such feature when ``reset_without_old``; otherwise a feature counts
    only when its interval changed (an old limit that was missing has
    interval 0, so it changed). A change of ``limit`` alone keeps the usage:
    the bucket keeps its level and refills at the new rate. (The reference's
    third condition, a usage key TTL longer than the interval, has no
    meaning for a token bucket.)
    """
    if not new.id:
        return []
    comparable = old is not None and old.id == new.id
    out: list[str] = []
    for feature in FEATURES:
        limit = new.limit_for(feature)
        if limit is None:
            continue
        if not comparable:
            if reset_without_old:
                out.append(feature)
            continue
        assert old is not None
        before = old.rate_limits.get(feature)
        if before is None or before.interval_s != limit.interval_s:
            out.append(feature)
    return out


async def reset_features(reset_usage: ResetUsage | None, actor_id: str, features: list[str]) -> None:
    """Call the limiter's reset for each feature; a failure is logged, never raised."""
    if reset_usage is None or not features:
        return
    results = await asyncio.gather(*(reset_usage(actor_id, f) for f in features), return_exceptions=True)
    for feature, result in zip(features, results):
        if isinstance(result, BaseException):
            log.warning("usage reset for actor %s feature %s failed: %s", actor_id, feature, result)


T = TypeVar("T")


class SingleFlight(Generic[T]):
    """One in-flight call per key; concurrent callers share its result.

    The call runs as its own task, so a caller that goes away (client
    disconnect) does not cancel it for the others.
    """

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    async def do(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(factory())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return await asyncio.shield(task)

    def _done(self, key: str, task: asyncio.Task[T]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not reported as lost


class OnceLog:
    """Log a recurring condition once until it clears."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._active = False

    def warn(self, message: str, *args: object) -> None:
        if not self._active:
            self._active = True
            self._log.warning(message, *args)

    def clear(self) -> None:
        self._active = False


class CachedGraphQLSource:
    """The lookup and refresh flow both GraphQL sources share.

    A cached actor is served while it is fresh (``refresh_after_s``); a stale
    one triggers one fetch per token (single flight); when the API is down a
    cached actor, even stale, is served and the outage logged once, and for
    ``OUTAGE_SKIP_S`` after a failure stale actors are served without asking
    again. Subclasses say how to fetch and how to answer from the cache.
    """

    name: str
    refresh_after_s: float
    # The actor cache's key namespace, the tokens this source answers for, and
    # the cooldown between refreshes of one actor (a config attribute name).
    namespace: str
    token_prefix: str
    cooldown_setting: str

    def __init__(
        self,
        graphql: Any,
        redis: object | None,
        config: ActorsConfig,
        reset_usage: ResetUsage | None = None,
        clock: Callable[[], float] = time.time,
        *,
        cache: ActorCache | None = None,
    ) -> None:
        namespace = self.namespace
        self._graphql = graphql
        self._config = config
        self._reset_usage = reset_usage
        self._clock = clock
        self._cache = cache or make_actor_cache(redis, namespace, ttl_s=config.sources_cache_ttl, clock=clock)
        self._flight: SingleFlight[Actor] = SingleFlight()
        self._stale_log = OnceLog(log)

    def normalise_token(self, token: str) -> str:
        return token

    async def get(self, token: str) -> Actor:
        if not token:
            raise NotFromSource("no token provided")
        token = self.normalise_token(token)
        if not token.startswith(self.token_prefix):
            raise NotFromSource("unknown token prefix")
        if len(token) != TOKEN_LENGTH:
            raise InvalidTokenFormat()
        return await self._lookup(token)

    async def update(self, actor: Actor, token: str) -> Actor:
        token = self.normalise_token(token)
        if not token.startswith(self.token_prefix) or len(token) != TOKEN_LENGTH:
            return actor
        return await self._refresh(actor, token, getattr(self._config, self.cooldown_setting))

    @property
    def cache(self) -> ActorCache:
        return self._cache

    async def _fetch_and_cache(self, token: str, old: Actor | None) -> Actor:
        raise NotImplementedError

    async def _answer_from_cache(self, cached: Actor) -> Actor:
        raise NotImplementedError

    async def _lookup(self, token: str) -> Actor:
        """``token`` is already checked and normalised by the subclass."""
        cached = await self._read(token_key(token))
        if cached is not None and not self._is_stale(cached):
            return await self._answer_from_cache(cached)
        if cached is not None and self._graphql.failed_within(OUTAGE_SKIP_S):
            return await self._answer_from_cache(cached)
        try:
            actor = await self._flight.do(token, lambda: self._fetch_and_cache(token, cached))
        except SourceUnavailable:
            if cached is None:
                raise
            self._stale_log.warn("GraphQL API unavailable: serving cached %s actors, refreshing later", self.name)
            return await self._answer_from_cache(cached)
        self._stale_log.clear()
        return actor

    async def _refresh(self, actor: Actor, token: str, cooldown_s: float) -> Actor:
        """Re-fetch now unless the actor was refreshed within the cooldown (by any process)."""
        last = actor.last_updated
        latest = await self._read(token_key(token))
        if latest is not None and latest.last_updated is not None and (last is None or latest.last_updated > last):
            last = latest.last_updated
        now = self._clock()
        if last is not None and now - last < cooldown_s:
            raise ActorRecentlyUpdated(last + cooldown_s - now)
        return await self._flight.do(token, lambda: self._fetch_and_cache(token, latest or actor))

    def _is_stale(self, actor: Actor) -> bool:
        return actor.last_updated is None or self._clock() - actor.last_updated > self.refresh_after_s

    async def _read(self, key: str) -> Actor | None:
        raw = await self._cache.get(key)
        if raw is None:
            return None
        try:
            return decode_actor(raw)
        except CorruptEntry as exc:
            log.error("deleting corrupt %s cache entry: %s", self.name, exc)
            await self._cache.delete(key)
            return None
