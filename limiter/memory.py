"""The in-process limiter: the embedded default, and the Redis limiter's twin.

Same semantics as limiter/redis_limiter.py; it is exact within one process
because the event loop runs each call to completion.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from limiter.base import CONCURRENCY, QUOTA, TOKENS, Decision, LimitRule, LimitStatus


@dataclass(slots=True)
class _Bucket:
    level: float
    updated_at: float
    tokens_level: float | None = None
    leases: dict[str, float] = field(default_factory=dict)


class MemoryLimiter:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _refilled(self, rule: LimitRule, now: float) -> _Bucket:
        key = (rule.bucket, rule.feature)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(level=float(rule.limit), updated_at=now)
            self._buckets[key] = bucket
        elapsed = max(0.0, now - bucket.updated_at)
        bucket.level = min(float(rule.limit), bucket.level + elapsed * rule.refill_per_s)
        if rule.tokens_limit is not None:
            if bucket.tokens_level is None:
                bucket.tokens_level = float(rule.tokens_limit)
            token_rate = rule.tokens_limit / rule.interval_s
            bucket.tokens_level = min(
                float(rule.tokens_limit), bucket.tokens_level + elapsed * token_rate
            )
        bucket.updated_at = now
        if bucket.leases:
            for lease_id in [lid for lid, exp in bucket.leases.items() if exp <= now]:
                del bucket.leases[lease_id]
        return bucket

    async def acquire(self, rule: LimitRule, *, cost: int = 1, token_reserve: int = 0) -> Decision:
        now = self._clock()
        bucket = self._refilled(rule, now)
        rate = rule.refill_per_s
        if rule.concurrency > 0 and len(bucket.leases) >= rule.concurrency:
            soonest = min(bucket.leases.values())
            return Decision(
                allowed=False,
                cause=CONCURRENCY,
                limit=rule.concurrency,
                remaining=0,
                retry_after_s=max(1.0, min(soonest - now, 1.0)),
                reset_s=max(0.0, soonest - now),
            )
        if bucket.level < cost:
            return Decision(
                allowed=False,
                cause=QUOTA,
                limit=rule.limit,
                remaining=int(math.floor(bucket.level)),
                retry_after_s=(cost - bucket.level) / rate,
                reset_s=(rule.limit - bucket.level) / rate,
            )
        if rule.tokens_limit is not None and bucket.tokens_level is not None:
            needed = max(1, token_reserve)
            if bucket.tokens_level < needed:
                token_rate = rule.tokens_limit / rule.interval_s
                return Decision(
                    allowed=False,
                    cause=TOKENS,
                    limit=rule.tokens_limit,
                    remaining=max(0, int(math.floor(bucket.tokens_level))),
                    retry_after_s=(needed - bucket.tokens_level) / token_rate,
                    reset_s=(rule.tokens_limit - bucket.tokens_level) / token_rate,
                )
            bucket.tokens_level -= token_reserve
        bucket.level -= cost
        lease_id: str | None = None
        if rule.concurrency > 0:
            lease_id = uuid.uuid4().hex
            bucket.leases[lease_id] = now + rule.lease_ttl_s
        return Decision(
            allowed=True,
            cause=None,
            limit=rule.limit,
            remaining=int(math.floor(bucket.level)),
            retry_after_s=0.0,
            reset_s=(rule.limit - bucket.level) / rate,
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
        bucket = self._refilled(rule, self._clock())
        if decision.lease_id is not None:
            bucket.leases.pop(decision.lease_id, None)
        if refund:
            bucket.level = min(float(rule.limit), bucket.level + decision.cost)
            if bucket.tokens_level is not None and rule.tokens_limit is not None:
                bucket.tokens_level = min(
                    float(rule.tokens_limit), bucket.tokens_level + decision.token_reserve
                )
            return
        if actual_cost is not None and actual_cost != decision.cost:
            # Settling may push the level below zero: a large batch that was
            # under-estimated is paid for by waiting longer, never forgiven.
            bucket.level = min(float(rule.limit), bucket.level + decision.cost - actual_cost)
        if actual_tokens is not None and bucket.tokens_level is not None and rule.tokens_limit:
            bucket.tokens_level = min(
                float(rule.tokens_limit),
                bucket.tokens_level + decision.token_reserve - actual_tokens,
            )

    async def status(self, rule: LimitRule) -> LimitStatus:
        bucket = self._refilled(rule, self._clock())
        rate = rule.refill_per_s
        return LimitStatus(
            limit=rule.limit,
            remaining=max(0, int(math.floor(bucket.level))),
            used=max(0, int(math.ceil(rule.limit - bucket.level))),
            reset_s=(rule.limit - bucket.level) / rate,
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
