"""The ordered source chain with a small in-process TTL cache in front.

The first source that does not answer NotFromSource decides. Its outcome
becomes a GatewayError here, so handlers only map errors to events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

from actors.base import (
    ActorSource,
    InvalidTokenFormat,
    NotFromSource,
    SourceError,
    SourceUnavailable,
    SyncableSource,
    TokenDenied,
    UpdatableSource,
)
from actors.model import Actor
from actors.tokens import DOTCOM_USER_PREFIX, check_token_format, token_sha256
from errors import GatewayError, ServiceUnavailable, Unauthorized

log = logging.getLogger("gateway.actors")


def actor_source_of(source: ActorSource) -> str:
    """The source name events carry for ``source`` (the reference's name; see product_subscriptions)."""
    return str(getattr(source, "actor_source", source.name))


class TokenDeniedError(Unauthorized):
    """401 after a source denied the token; the handler records an Unauthorized event."""

    def __init__(self, message: str, *, source: str, reason: str) -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason


class ActorCacheStats:
    __slots__ = ("hits", "misses")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0


class SourceChain:
    def __init__(
        self,
        sources: Sequence[ActorSource],
        *,
        local_cache_ttl_s: float,
        local_cache_size: int = 100_000,
    ) -> None:
        self.sources = list(sources)
        # By configured name and by the source name its actors carry (refresh looks up actor.source).
        self._by_name = {s.name: s for s in self.sources}
        for s in self.sources:
            self._by_name.setdefault(actor_source_of(s), s)
        self._ttl = local_cache_ttl_s
        self._size = local_cache_size
        self._cache: OrderedDict[str, tuple[float, Actor]] = OrderedDict()
        self.stats = ActorCacheStats()

    def source(self, name: str) -> ActorSource | None:
        return self._by_name.get(name)

    async def get(self, token: str) -> Actor:
        cache_key = token_sha256(token) if token else ""
        now = time.monotonic()
        cached = self._cache.get(cache_key)
        if cached is not None and cached[0] > now:
            self.stats.hits += 1
            return cached[1]
        self.stats.misses += 1
        actor = await self._resolve(token)
        if self._ttl > 0:
            self._cache[cache_key] = (now + self._ttl, actor)
            self._cache.move_to_end(cache_key)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return actor

    def invalidate(self, token: str = "", *, actor_id: str | None = None) -> None:
        if token:
            self._cache.pop(token_sha256(token), None)
        if actor_id is not None:
            for key in [k for k, (_, a) in self._cache.items() if a.id == actor_id]:
                del self._cache[key]

    def clear_cache(self) -> None:
        self._cache.clear()

    async def _resolve(self, token: str) -> Actor:
        try:
            check_token_format(token)
        except InvalidTokenFormat as exc:
            named = "dotcom-user" if token.startswith(DOTCOM_USER_PREFIX) else "product-subscriptions"
            raise Unauthorized(f"{named}: {exc}") from exc
        for source in self.sources:
            try:
                return await source.get(token)
            except NotFromSource:
                continue
            except TokenDenied as exc:
                raise TokenDeniedError(
                    f"{source.name}: {exc}", source=actor_source_of(source), reason=exc.reason
                ) from exc
            except InvalidTokenFormat as exc:
                raise Unauthorized(f"{source.name}: {exc}") from exc
            except SourceUnavailable as exc:
                raise ServiceUnavailable(f"{source.name}: {exc}") from exc
            except SourceError as exc:
                raise ServiceUnavailable(f"{source.name}: {exc}") from exc
            except GatewayError:
                raise
            except Exception as exc:  # a source bug must not become a hang or a 500 without context
                log.exception("actor source %s failed", source.name)
                raise ServiceUnavailable(f"{source.name}: {exc}") from exc
        reason = "no source found for token" if token else "no token provided"
        raise Unauthorized(f"token not from source: {reason}")

    async def refresh(self, actor: Actor, token: str) -> Actor:
        """Re-fetch an actor from its own source (POST /v1/limits/refresh)."""
        source = self._by_name.get(actor.source)
        if not isinstance(source, UpdatableSource):
            return actor
        updated = await source.update(actor, token)
        self.invalidate(actor_id=actor.id)
        return updated

    async def sync_all(self) -> dict[str, int | str]:
        """Run every syncable source at once; report counts or errors by source."""
        syncable = [s for s in self.sources if isinstance(s, SyncableSource)]
        results = await asyncio.gather(*(s.sync() for s in syncable), return_exceptions=True)
        self.clear_cache()
        report: dict[str, int | str] = {}
        for source, result in zip(syncable, results):
            report[source.name] = f"error: {result}" if isinstance(result, BaseException) else result
        return report
