"""The in-process limiter: the embedded default, and the Redis limiter's twin.

Same semantics as limiter/redis_limiter.py (the same contract suite runs
against both); it is exact within one process because the event loop runs
each call to completion. Buckets that have refilled to full and hold no
live lease are forgotten by a periodic sweep, as Redis lets such keys
expire, so memory follows the active actors, not every actor ever seen.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from limiter.base import (
    CONCURRENCY,
    MAX_DURATION_S,
    MAX_UNITS,
    QUOTA,
    TOKENS,
    Decision,
    LimitRule,
    LimitStatus,
    bounded_rule,
    bounded_units,
    denied_invalid,
    invalid,
)
from limiter.scripts import MAX_TTL_MS

SWEEP_INTERVAL_S = 60.0
# The longest duration reported, as the Redis scripts cap theirs.
MAX_WAIT_S = MAX_TTL_MS / 1000.0


def _wait(seconds: float) -> float:
    return min(max(seconds, 0.0), MAX_WAIT_S)


@dataclass(slots=True)
class _Bucket:
    level: float
    updated_at: float
    tokens_level: float | None = None
    leases: dict[str, float] = field(default_factory=dict)
    # The last rule seen, so the sweep can tell a full bucket without one.
    capacity: float = 0.0
    rate: float = 0.0
    tokens_capacity: float | None = None
    tokens_rate: float = 0.0

    def idle_and_full(self, now: float) -> bool:
        if any(expiry > now for expiry in self.leases.values()):
            return False
        elapsed = max(0.0, now - self.updated_at)
        if self.level + elapsed * self.rate < self.capacity:
            return False
        if self.tokens_level is not None and self.tokens_capacity is not None:
            return self.tokens_level + elapsed * self.tokens_rate >= self.tokens_capacity
        return True


class MemoryLimiter:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._next_sweep = clock() + SWEEP_INTERVAL_S

    def __len__(self) -> int:
        """Buckets held in memory (a gauge for the metrics collector)."""
        return len(self._buckets)

    def _refilled(self, rule: LimitRule, now: float) -> _Bucket:
        key = (rule.bucket, rule.feature)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(level=float(rule.limit), updated_at=now)
            self._buckets[key] = bucket
        elapsed = max(0.0, now - bucket.updated_at)
        bucket.capacity = float(rule.limit)
        bucket.rate = rule.refill_per_s
        bucket.level = min(bucket.capacity, bucket.level + elapsed * bucket.rate)
        if rule.tokens_limit is not None:
            bucket.tokens_capacity = float(rule.tokens_limit)
            bucket.tokens_rate = rule.tokens_limit / rule.interval_s
            if bucket.tokens_level is None:
                bucket.tokens_level = bucket.tokens_capacity
            bucket.tokens_level = min(
                bucket.tokens_capacity, bucket.tokens_level + elapsed * bucket.tokens_rate
            )
        bucket.updated_at = now
        if bucket.leases:
            for lease_id in [lid for lid, exp in bucket.leases.items() if exp <= now]:
                del bucket.leases[lease_id]
        return bucket

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S
        for key in [k for k, b in self._buckets.items() if b.idle_and_full(now)]:
            del self._buckets[key]

    async def acquire(self, rule: LimitRule, *, cost: int = 1, token_reserve: int = 0) -> Decision:
        rule = bounded_rule(rule)
        if invalid(rule):
            return denied_invalid(rule)
        cost = bounded_units(cost)
        token_reserve = bounded_units(token_reserve)
        now = self._clock()
        self._sweep(now)
        bucket = self._refilled(rule, now)
        rate = rule.refill_per_s
        if rule.concurrency > 0 and len(bucket.leases) >= rule.concurrency:
            soonest = min(bucket.leases.values())
            # Requests in flight usually end soon: suggest a retry in one second.
            return Decision(
                allowed=False,
                cause=CONCURRENCY,
                limit=rule.concurrency,
                remaining=0,
                retry_after_s=1.0,
                reset_s=_wait(soonest - now),
            )
        if bucket.level < cost:
            return Decision(
                allowed=False,
                cause=QUOTA,
                limit=rule.limit,
                remaining=max(0, int(math.floor(bucket.level))),
                retry_after_s=_wait((cost - bucket.level) / rate),
                reset_s=_wait((rule.limit - bucket.level) / rate),
            )
        if rule.tokens_limit is not None and bucket.tokens_level is not None:
            if rule.tokens_limit <= 0:
                return Decision(
                    allowed=False,
                    cause=TOKENS,
                    limit=0,
                    remaining=0,
                    retry_after_s=rule.interval_s,
                    reset_s=rule.interval_s,
                )
            needed = max(1, token_reserve)
            if bucket.tokens_level < needed:
                token_rate = rule.tokens_limit / rule.interval_s
                return Decision(
                    allowed=False,
                    cause=TOKENS,
                    limit=rule.tokens_limit,
                    remaining=max(0, int(math.floor(bucket.tokens_level))),
                    retry_after_s=_wait((needed - bucket.tokens_level) / token_rate),
                    reset_s=_wait((rule.tokens_limit - bucket.tokens_level) / token_rate),
                )
            bucket.tokens_level -= token_reserve
        bucket.level -= cost
        lease_id: str | None = None
        if rule.concurrency > 0:
            lease_id = os.urandom(16).hex()
            bucket.leases[lease_id] = now + rule.lease_ttl_s
        return Decision(
            allowed=True,
            cause=None,
            limit=rule.limit,
            remaining=max(0, int(math.floor(bucket.level))),
            retry_after_s=0.0,
            reset_s=_wait((rule.limit - bucket.level) / rate),
            lease_id=lease_id,
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
    ) -> None:
        if not decision.allowed:
            return
        rule = bounded_rule(rule)
        if invalid(rule):
            return
        bucket = self._refilled(rule, self._clock())
        if decision.lease_id is not None:
            bucket.leases.pop(decision.lease_id, None)
        cost = bounded_units(decision.cost)
        reserve = bounded_units(decision.token_reserve)
        if refund:
            bucket.level = min(float(rule.limit), bucket.level + cost)
            if bucket.tokens_level is not None and rule.tokens_limit:
                bucket.tokens_level = min(float(rule.tokens_limit), bucket.tokens_level + reserve)
            return
        if actual_cost is not None and actual_cost != cost:
            # Settling may push the level below zero: a large batch that was
            # under-estimated is paid for by waiting longer, never forgiven
            # (down to -MAX_UNITS, as in Redis).
            level = bucket.level + cost - bounded_units(actual_cost)
            bucket.level = max(-float(MAX_UNITS), min(float(rule.limit), level))
        if actual_tokens is not None and bucket.tokens_level is not None and rule.tokens_limit:
            level = bucket.tokens_level + reserve - bounded_units(actual_tokens)
            bucket.tokens_level = max(-float(MAX_UNITS), min(float(rule.tokens_limit), level))

    async def renew(self, rule: LimitRule, decision: Decision, ttl_s: float) -> bool:
        """Extend the decision's lease to at least ``ttl_s`` from now; see limiter/base.py."""
        if not decision.allowed or decision.lease_id is None:
            return False
        bucket = self._buckets.get((rule.bucket, rule.feature))
        if bucket is None:
            return False
        now = self._clock()
        expiry = bucket.leases.get(decision.lease_id)
        if expiry is None or expiry <= now:
            return False
        ttl_s = 0.0 if math.isnan(ttl_s) else min(ttl_s, MAX_DURATION_S)
        bucket.leases[decision.lease_id] = max(expiry, now + max(ttl_s, 0.001))
        return True

    async def drain_releases(self, timeout_s: float = 5.0) -> int:
        """Nothing to wait for: releases here complete within their call."""
        return 0

    async def status(self, rule: LimitRule) -> LimitStatus:
        rule = bounded_rule(rule)
        if invalid(rule):
            return LimitStatus(
                limit=max(0, rule.limit), remaining=0, used=0, reset_s=0.0, in_flight=0,
                tokens_limit=rule.tokens_limit,
                tokens_remaining=None if rule.tokens_limit is None else 0,
            )
        now = self._clock()
        key = (rule.bucket, rule.feature)
        if key in self._buckets:
            bucket = self._refilled(rule, now)
        else:
            # Reading must not create state (the Redis twin writes nothing either).
            bucket = _Bucket(level=float(rule.limit), updated_at=now)
            if rule.tokens_limit is not None:
                bucket.tokens_level = float(rule.tokens_limit)
        rate = rule.refill_per_s
        return LimitStatus(
            limit=rule.limit,
            remaining=max(0, int(math.floor(bucket.level))),
            used=max(0, int(math.ceil(rule.limit - bucket.level))),
            reset_s=_wait((rule.limit - bucket.level) / rate),
            in_flight=len(bucket.leases),
            tokens_limit=rule.tokens_limit,
            tokens_remaining=(
                max(0, int(math.floor(bucket.tokens_level)))
                if bucket.tokens_level is not None
                else None
            ),
        )

    async def reset(self, bucket: str, feature: str) -> None:
        state = self._buckets.get((bucket, feature))
        if state is not None:
            # Keep live leases: they belong to requests still in flight.
            self._buckets[(bucket, feature)] = _Bucket(
                level=float("inf"), updated_at=self._clock(), leases=state.leases
            )

    async def close(self) -> None:
        self._buckets.clear()
