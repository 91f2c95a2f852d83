"""The production limiter: token buckets and concurrency leases in Redis.

Each call is ONE round trip (EVALSHA of a script in limiter/scripts.py) on
the three keys of one (actor, feature) bucket, which share a hash tag so
Redis Cluster serves them from one slot. Scripts are called by SHA and
loaded again when the server answers NOSCRIPT (restart, SCRIPT FLUSH,
failover to a replica that never saw them).

On a single node the commands go through the limiter's own pipelined RESP2
client (redisconn/resp.py), built from the redis-py client's settings: all the
EVALSHAs of one loop iteration leave in one write. On Redis Cluster they go
through redis-py's cluster client, one command at a time.

The redis-py client is closed by ``close()`` only when ``owns_client`` is
set: a client shared with the actor cache or the notifier is closed by
whoever created it (see redisconn/connect.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from limiter import scripts
from limiter.base import (
    CONCURRENCY,
    MAX_DURATION_S,
    QUOTA,
    TOKENS,
    Decision,
    InFlight,
    LimitRule,
    LimitStatus,
    bounded_rule,
    bounded_units,
    denied_invalid,
    invalid,
)
from redisconn.connect import lean_client
from redisconn.resp import RespClient

KEY_PREFIX = "rate_limit:"

_CAUSES: dict[bytes | str, str] = {
    b"quota": QUOTA,
    b"concurrency": CONCURRENCY,
    b"tokens": TOKENS,
    "quota": QUOTA,
    "concurrency": CONCURRENCY,
    "tokens": TOKENS,
}


def bucket_keys(bucket: str, feature: str) -> tuple[str, str, str]:
    """The bucket, token-quota and lease keys of one (actor, feature) pair.

    Only the text between the first ``{`` and the next ``}`` is hashed by
    Redis Cluster, and every key here starts with that same tag, so the
    three keys share a slot whatever characters the actor id contains.
    """
    tag = "{" + feature + ":" + bucket + "}"
    return (
        f"{KEY_PREFIX}{tag}:bucket",
        f"{KEY_PREFIX}{tag}:tokens",
        f"{KEY_PREFIX}concurrent:{tag}",
    )


@dataclass(slots=True)
class RedisLimiterStats:
    """Plain counters, read by the metrics collector."""

    script_calls: int = 0
    noscript_replies: int = 0
    script_loads: int = 0


class _Store(Protocol):
    """The few commands the limiter sends: RespClient on one node, redis-py's RedisCluster on a cluster."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Awaitable[Any]: ...
    def script_load(self, source: str) -> Awaitable[Any]: ...
    def delete(self, *keys: str) -> Awaitable[Any]: ...
    def ping(self) -> Awaitable[Any]: ...


class _Script:
    """A Lua script called by SHA, loaded again on NOSCRIPT.

    Concurrent calls that all meet NOSCRIPT (after a Redis restart) load the
    script once: the first loads it, the others wait and retry.
    """

    def __init__(self, store: _Store, source: str, stats: RedisLimiterStats) -> None:
        self._store = store
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()
        self._stats = stats
        self._load_lock = asyncio.Lock()
        self._loads = 0

    async def load(self) -> None:
        seen = self._loads
        async with self._load_lock:
            if seen == self._loads:
                self._sha = await self._store.script_load(self._source)
                self._loads += 1
                self._stats.script_loads += 1

    async def __call__(self, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        self._stats.script_calls += 1
        try:
            return await self._store.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:
            self._stats.noscript_replies += 1
            await self.load()
            return await self._store.evalsha(self._sha, len(keys), *keys, *args)


def _ms(seconds: float) -> str:
    # repr keeps every digit of the float; Lua's tonumber reads it back exactly.
    return repr(float(seconds) * 1000.0)


class RedisLimiter:
    """The limiter on a redis-py client from redisconn/connect.py.

    On a single node the client only says where Redis is: every command goes
    through a RespClient built from its settings (see redisconn/resp.py for
    why), which this limiter owns and closes. A RedisCluster is used as is.
    """

    def __init__(self, client: Redis | RedisCluster, *, owns_client: bool = False) -> None:
        self._client = client
        self._owns_client = owns_client
        self._lean: RespClient | None = None
        store: _Store
        if isinstance(client, RedisCluster):
            # EVALSHAs cannot be pipelined through redis-py's cluster client; each goes on its own.
            store = client
        else:
            store = self._lean = lean_client(client)
        self._store = store
        self.stats = RedisLimiterStats()
        self._acquire = _Script(store, scripts.ACQUIRE, self.stats)
        self._release = _Script(store, scripts.RELEASE, self.stats)
        self._status = _Script(store, scripts.STATUS, self.stats)
        self._renew = _Script(store, scripts.RENEW, self.stats)
        # Releases awaiting Redis's answer, so shutdown can wait for them (drain_releases).
        self._releases = InFlight()

    @property
    def call_timeout_s(self) -> float | None:
        """The deadline every call already has on its own (the RESP client's), or None.

        The failover limiter skips its own timer per call when this is within
        its timeout: a second timer per Redis call was pure cost.
        """
        return self._lean.timeout_s if self._lean is not None else None

    @staticmethod
    def new_lease_id(rule: LimitRule) -> str | None:
        """A fresh lease id for ``rule`` (None when it takes no lease); see ``acquire``."""
        return os.urandom(16).hex() if rule.concurrency > 0 else None

    async def acquire(
        self, rule: LimitRule, *, cost: int = 1, token_reserve: int = 0, lease_id: str | None = None
    ) -> Decision:
        """Admit or refuse. ``lease_id`` lets the caller choose the lease's id before the call,
        so it can free that lease (``abandon``) if it gives up waiting for the answer."""
        rule = bounded_rule(rule)
        if invalid(rule):
            return denied_invalid(rule)
        cost = bounded_units(cost)
        token_reserve = bounded_units(token_reserve)
        if rule.concurrency > 0:
            lease_id = lease_id or os.urandom(16).hex()
        else:
            lease_id = ""
        reply = await self._acquire(
            bucket_keys(rule.bucket, rule.feature),
            (
                rule.limit,
                _ms(rule.interval_s),
                cost,
                rule.concurrency,
                _ms(rule.lease_ttl_s),
                lease_id,
                -1 if rule.tokens_limit is None else rule.tokens_limit,
                token_reserve,
            ),
        )
        allowed = int(reply[0]) == 1
        if not allowed:
            return Decision(
                allowed=False,
                cause=_CAUSES[reply[1]],
                limit=int(reply[2]),
                remaining=int(reply[3]),
                retry_after_s=int(reply[4]) / 1000.0,
                reset_s=max(0, int(reply[5])) / 1000.0,
            )
        return Decision(
            allowed=True,
            cause=None,
            limit=int(reply[2]),
            remaining=int(reply[3]),
            retry_after_s=0.0,
            reset_s=max(0, int(reply[5])) / 1000.0,
            lease_id=lease_id or None,
            cost=cost,
            token_reserve=token_reserve if rule.tokens_limit is not None else 0,
        )

    async def release(
        self,
        rule: LimitRule,
        decision: Decision,
        *,
        refund: bool,
        actual_cost: int | None = None,
        actual_tokens: int | None = None,
        only_if_leased: bool = False,
    ) -> None:
        """Free the lease and refund or settle.

        ``only_if_leased`` makes a replayed release safe: it accounts only if
        the lease was still held, so a release that did run before the
        connection failed is not counted twice. Every figure is clamped to
        0..MAX_UNITS first (usage figures come from upstreams).
        """
        if not decision.allowed:
            return
        rule = bounded_rule(rule)
        if invalid(rule):
            return
        with self._releases:
            await self._release(
                bucket_keys(rule.bucket, rule.feature),
                (
                    rule.limit,
                    _ms(rule.interval_s),
                    decision.lease_id or "",
                    "refund" if refund else "settle",
                    bounded_units(decision.cost),
                    "" if actual_cost is None else bounded_units(actual_cost),
                    -1 if rule.tokens_limit is None else rule.tokens_limit,
                    bounded_units(decision.token_reserve),
                    "" if actual_tokens is None else bounded_units(actual_tokens),
                    "1" if only_if_leased else "0",
                ),
            )

    async def abandon(
        self, rule: LimitRule, lease_id: str, *, cost: int, token_reserve: int = 0, only_accounting: bool = False
    ) -> bool:
        """Undo an acquire whose answer never came (timed out, connection lost).

        If it did run and admit, its lease ``lease_id`` is still held: free it and
        give back ``cost`` and ``token_reserve``. If it never ran (or refused), there
        is no such lease and nothing changes. True when a lease was freed.
        ``only_accounting`` frees the lease without giving anything back (a release
        whose own script failed).
        """
        rule = bounded_rule(rule)
        reply = await self._release(
            bucket_keys(rule.bucket, rule.feature),
            (
                rule.limit,
                _ms(rule.interval_s),
                lease_id,
                "settle" if only_accounting else "refund",
                0 if only_accounting else bounded_units(cost),
                "",
                -1 if rule.tokens_limit is None else rule.tokens_limit,
                0 if only_accounting else bounded_units(token_reserve),
                "",
                "1",
            ),
        )
        return int(reply[0]) == 1

    async def renew(self, rule: LimitRule, decision: Decision, ttl_s: float) -> bool:
        """Extend the decision's lease to at least ``ttl_s`` from now (one EVALSHA); see limiter/base.py."""
        if not decision.allowed or not decision.lease_id:
            return False
        ttl_s = 0.0 if math.isnan(ttl_s) else min(ttl_s, MAX_DURATION_S)
        reply = await self._renew(
            bucket_keys(rule.bucket, rule.feature), (decision.lease_id, _ms(max(ttl_s, 0.001)))
        )
        return int(reply) == 1

    async def drain_releases(self, timeout_s: float = 5.0) -> int:
        """Wait (at most ``timeout_s``) for releases still waiting on Redis; returns those left."""
        await asyncio.sleep(0)  # releases spawned just before start running
        return await self._releases.wait(asyncio.get_running_loop().time() + timeout_s)

    async def status(self, rule: LimitRule) -> LimitStatus:
        rule = bounded_rule(rule)
        if invalid(rule):
            return LimitStatus(
                limit=max(0, rule.limit), remaining=0, used=0, reset_s=0.0, in_flight=0,
                tokens_limit=rule.tokens_limit,
                tokens_remaining=None if rule.tokens_limit is None else 0,
            )
        reply = await self._status(
            bucket_keys(rule.bucket, rule.feature),
            (rule.limit, _ms(rule.interval_s), -1 if rule.tokens_limit is None else rule.tokens_limit),
        )
        tokens_remaining = int(reply[4])
        return LimitStatus(
            limit=rule.limit,
            remaining=int(reply[0]),
            used=int(reply[1]),
            reset_s=max(0, int(reply[2])) / 1000.0,
            in_flight=int(reply[3]),
            tokens_limit=rule.tokens_limit,
            tokens_remaining=None if rule.tokens_limit is None else max(0, tokens_remaining),
        )

    async def reset(self, bucket: str, feature: str) -> None:
        # Usage only: the lease set belongs to requests still in flight.
        bucket_key, tokens_key, _ = bucket_keys(bucket, feature)
        await self._store.delete(bucket_key, tokens_key)

    async def load_scripts(self) -> None:
        """Load every script once at start, so the first requests pay no NOSCRIPT."""
        for script in (self._acquire, self._release, self._status, self._renew):
            await script.load()

    async def ping(self) -> None:
        """One cheap round trip, used by the failover wrapper to see Redis come back."""
        await self._store.ping()

    async def close(self) -> None:
        if self._lean is not None:
            await self._lean.close()
        if self._owns_client:
            await self._client.aclose()
