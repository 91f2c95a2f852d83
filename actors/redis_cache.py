"""The remote sources' actor cache: Redis in production, a bounded dict without Redis.

Keys follow the reference's layout (``v2:<namespace>:v2:<suffix>``, written
with SET EX, i.e. SETEX, and the configured TTL), so every gateway process
shares one cache; but a token is never stored: its suffix is
``sha256_<hex digest>`` (``token_key``), and actor ids stay as they are. The cache is an optimisation and a
fallback, never a dependency: a Redis error is logged once and treated as
a miss, so the sources fall through to the GraphQL API.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from actors.tokens import token_sha256

log = logging.getLogger("gateway.actors.cache")

DATA_VERSION = "v2"  # the platform cache's prefix
SOURCE_VERSION = "v2"  # the sources' format version; bumping it would orphan every entry
DOTCOM_USERS_NAMESPACE = "dotcom-users"
SUBSCRIPTIONS_NAMESPACE = "product-subscriptions"

_MEMORY_MAX_ENTRIES = 100_000


TOKEN_KEY_PREFIX = "sha256_"


def cache_prefix(namespace: str) -> str:
    return f"{DATA_VERSION}:{namespace}:{SOURCE_VERSION}:"


def token_key(token: str) -> str:
    """The cache suffix for a client token: its digest, never the token itself."""
    return TOKEN_KEY_PREFIX + token_sha256(token)


def is_token_key(suffix: str) -> bool:
    return suffix.startswith(TOKEN_KEY_PREFIX)


class ActorCache(Protocol):
    """Bytes by key suffix (a token or an actor id) inside one namespace."""

    prefix: str

    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    async def set_many(self, items: Mapping[str, bytes]) -> None: ...

    async def delete(self, *keys: str) -> None: ...

    async def full_keys(self) -> list[str]:
        """Every stored key of the namespace, prefix included (for pruning)."""
        ...


class _ErrorLog:
    """Log a failing store once per outage, not once per request."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._failing = False

    def failed(self, op: str, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            log.error("%s unavailable (%s: %s); treating as cache misses", self._what, op, exc)

    def ok(self) -> None:
        if self._failing:
            self._failing = False
            log.warning("%s reachable again", self._what)


class RedisActorCache:
    def __init__(self, redis: object, namespace: str, *, ttl_s: float) -> None:
        # redis.asyncio.Redis or RedisCluster; typed loosely so either fits.
        self._redis = redis
        self.prefix = cache_prefix(namespace)
        self._ttl = max(1, int(ttl_s))
        self._errors = _ErrorLog(f"actor cache Redis ({namespace})")

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self._redis.get(self._key(key))  # type: ignore[attr-defined]
        except Exception as exc:  # any store failure is a miss
            self._errors.failed("GET", exc)
            return None
        self._errors.ok()
        return _as_bytes(value)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        out: list[bytes | None] = []
        try:
            # Chunked so one call never builds a huge reply.
            for start in range(0, len(keys), 500):
                chunk = [self._key(k) for k in keys[start:start + 500]]
                values = await self._mget(chunk)
                out.extend(_as_bytes(v) for v in values)
        except Exception as exc:
            self._errors.failed("MGET", exc)
            return [None] * len(keys)
        self._errors.ok()
        return out

    async def _mget(self, keys: list[str]) -> list[object]:
        # A cluster client refuses a cross-slot MGET; it offers a split version instead.
        nonatomic = getattr(self._redis, "mget_nonatomic", None)
        if nonatomic is not None:
            return list(await nonatomic(keys))
        return list(await self._redis.mget(keys))  # type: ignore[attr-defined]

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        ttl = self._ttl if ttl_s is None else max(1, min(self._ttl, int(ttl_s)))
        try:
            await self._redis.set(self._key(key), value, ex=ttl)  # type: ignore[attr-defined]
        except Exception as exc:
            self._errors.failed("SET EX", exc)
            return
        self._errors.ok()

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        if not items:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)  # type: ignore[attr-defined]
            for count, (key, value) in enumerate(items.items(), 1):
                pipe.set(self._key(key), value, ex=self._ttl)
                if count % 500 == 0:
                    await pipe.execute()
            await pipe.execute()
        except Exception as exc:
            self._errors.failed("SET EX (pipeline)", exc)
            return
        self._errors.ok()

    async def delete(self, *keys: str) -> None:
        if not keys:
            return
        try:
            # One DEL per key: a cluster cannot delete keys of several slots at once.
            pipe = self._redis.pipeline(transaction=False)  # type: ignore[attr-defined]
            for key in keys:
                pipe.delete(self._key(key))
            await pipe.execute()
        except Exception as exc:
            self._errors.failed("DEL", exc)
            return
        self._errors.ok()

    async def full_keys(self) -> list[str]:
        # SCAN rather than the reference's KEYS: same result, without blocking Redis.
        keys: list[str] = []
        try:
            async for key in self._redis.scan_iter(match=self.prefix + "*", count=1000):  # type: ignore[attr-defined]
                keys.append(key.decode() if isinstance(key, bytes) else str(key))
        except Exception as exc:
            self._errors.failed("SCAN", exc)
            raise
        self._errors.ok()
        return keys


class MemoryActorCache:
    """The same semantics in-process (embedded default without Redis), bounded in size."""

    def __init__(
        self,
        namespace: str,
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
        max_entries: int = _MEMORY_MAX_ENTRIES,
    ) -> None:
        self.prefix = cache_prefix(namespace)
        self._ttl = max(1.0, float(int(ttl_s)))
        self._clock = clock
        self._max = max_entries
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        full = self.prefix + key
        entry = self._data.get(full)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._data[full]
            return None
        self._data.move_to_end(full)
        return entry[1]

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [await self.get(k) for k in keys]

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        ttl = self._ttl if ttl_s is None else max(1.0, min(self._ttl, float(int(ttl_s))))
        full = self.prefix + key
        self._data[full] = (self._clock() + ttl, bytes(value))
        self._data.move_to_end(full)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        for key, value in items.items():
            await self.set(key, value)

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._data.pop(self.prefix + key, None)

    async def full_keys(self) -> list[str]:
        now = self._clock()
        return [k for k, (expires, _) in self._data.items() if expires > now]

    def raw_set(self, full_key: str, value: bytes) -> None:
        """Store under an arbitrary full key (tests of malformed keys)."""
        self._data[full_key] = (self._clock() + self._ttl, value)


def make_actor_cache(
    redis: object | None, namespace: str, *, ttl_s: float, clock: Callable[[], float] = time.time
) -> ActorCache:
    if redis is None:
        return MemoryActorCache(namespace, ttl_s=ttl_s, clock=clock)
    return RedisActorCache(redis, namespace, ttl_s=ttl_s)


def key_suffix(full_key: str, prefix: str) -> str:
    return full_key[len(prefix):] if full_key.startswith(prefix) else full_key


def _as_bytes(value: object) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return str(value).encode()

