"""Where flagged prompts are kept for a while (reference 4.7.3 and 13).

Keys keep the reference's names, ``prompt:<traceId>:<feature>:<actorId>``,
so existing tooling that reads them from Redis still works. With Redis the
prompt is a plain string with a TTL (SETEX); without it, a bounded in-process
store gives the same TTL semantics for one process.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

PREFIX = "prompt:"
# A listing never walks more keys than this.
MAX_LISTED = 10_000


def prompt_key(trace_id: str, feature: str, actor_id: str) -> str:
    return f"{PREFIX}{trace_id}:{feature}:{actor_id}"


def split_key(key: str) -> dict[str, str] | None:
    """The listing entry of a key; None when the key is not ``prompt:<trace>:<feature>:<actor>``.

    The actor id is the remainder, so an actor id with ``:`` in it still parses.
    """
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX) :].split(":", 2)
    if len(parts) != 3 or not all(parts):
        return None
    return {"key": key, "traceId": parts[0], "feature": parts[1], "userId": parts[2]}


class PromptStore(Protocol):
    name: str

    async def record(self, key: str, prompt: str, ttl_s: float) -> None: ...

    async def keys(self) -> list[str]: ...

    async def get(self, key: str) -> str | None: ...


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisPromptStore:
    """On the gateway's Redis (single server or cluster; SCAN visits every primary)."""

    name = "redis"

    def __init__(self, client: Any) -> None:
        self._client = client

    async def record(self, key: str, prompt: str, ttl_s: float) -> None:
        await self._client.set(key, prompt.encode("utf-8", "surrogatepass"), ex=max(1, math.ceil(ttl_s)))

    async def keys(self) -> list[str]:
        found: list[str] = []
        async for key in self._client.scan_iter(match=PREFIX + "*", count=1000):
            found.append(_text(key))
            if len(found) >= MAX_LISTED:
                break
        return sorted(found)

    async def get(self, key: str) -> str | None:
        value = await self._client.get(key)
        return None if value is None else _text(value)


class MemoryPromptStore:
    """In-process, for one gateway without Redis: TTL per entry, bounded in count and bytes."""

    name = "memory"

    def __init__(
        self,
        *,
        max_entries: int = 1000,
        max_bytes: int = 32 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        _, prompt = self._entries.pop(key)
        self._bytes -= len(prompt)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            self._drop(key)

    async def record(self, key: str, prompt: str, ttl_s: float) -> None:
        if len(prompt) > self._max_bytes:
            prompt = prompt[: self._max_bytes]
        if key in self._entries:
            self._drop(key)
        self._expire()
        # Oldest first out when full, as a cache would.
        while self._entries and (len(self._entries) >= self._max_entries or self._bytes + len(prompt) > self._max_bytes):
            self._drop(next(iter(self._entries)))
        self._entries[key] = (self._clock() + ttl_s, prompt)
        self._bytes += len(prompt)

    async def keys(self) -> list[str]:
        self._expire()
        return sorted(self._entries)[:MAX_LISTED]

    async def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(key)
            return None
        return entry[1]
