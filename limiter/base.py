"""The limiter's contract, shared by the in-process limiter and the Redis one.

Admission is one atomic step: take ``cost`` from the actor's token bucket
for the feature (capacity ``limit``, refilled continuously at
``limit / interval_s``), check the optional token quota, and take an
in-flight concurrency lease. Nothing is taken unless everything passes.
The request then ends with exactly one ``release``, which frees the lease
and either refunds the reservation (non-2xx) or settles it to what was
really used.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

QUOTA = "quota"
CONCURRENCY = "concurrency"
TOKENS = "tokens"

# Every count that reaches a store (costs, token counts, limits) is clamped to
# 0..MAX_UNITS (2^40, about 1.1e12): far above any real quota, far below where
# a Lua double loses integer precision or a PEXPIRE goes out of range.
MAX_UNITS = 1 << 40
# The longest interval or lease a rule may ask for (10 years): beyond it the
# rule is clamped, so every duration a store computes stays finite and bounded.
MAX_DURATION_S = 10 * 365 * 86400.0


def bounded_units(value: int) -> int:
    """A count from outside (usage figure, cost, reserve) clamped to 0..MAX_UNITS."""
    if value <= 0:
        return 0
    if value >= MAX_UNITS:
        return MAX_UNITS
    return int(value)


def bounded_rule(rule: LimitRule) -> LimitRule:
    """``rule`` with every number within what the stores handle exactly.

    Limits are clamped to MAX_UNITS, intervals and lease TTLs to
    MAX_DURATION_S; an interval that is not a finite number becomes 0 (a rule
    that admits nothing). The rule itself is returned when nothing needs
    changing, which is every real rule: this is the hot path.
    """
    interval = rule.interval_s
    tokens = rule.tokens_limit
    if (
        0 <= rule.limit <= MAX_UNITS
        and 0 < interval <= MAX_DURATION_S
        and 0 <= rule.concurrency <= MAX_UNITS
        and 0 < rule.lease_ttl_s <= MAX_DURATION_S
        and (tokens is None or 0 <= tokens <= MAX_UNITS)
    ):
        return rule
    if not math.isfinite(interval) or interval <= 0:
        interval = 0.0
    lease_ttl = rule.lease_ttl_s
    if not math.isfinite(lease_ttl) or lease_ttl <= 0:
        lease_ttl = 0.001
    return replace(
        rule,
        limit=min(max(rule.limit, 0), MAX_UNITS) if rule.limit > 0 else rule.limit,
        interval_s=min(interval, MAX_DURATION_S),
        concurrency=min(max(rule.concurrency, 0), MAX_UNITS),
        lease_ttl_s=min(lease_ttl, MAX_DURATION_S),
        tokens_limit=None if tokens is None else min(max(tokens, 0), MAX_UNITS),
    )


@dataclass(frozen=True, slots=True)
class LimitRule:
    """What to enforce for one (actor, feature) pair.

    ``concurrency`` 0 means no in-flight limit. ``lease_ttl_s`` bounds how
    long a lease outlives a process that died holding it.
    """

    bucket: str
    feature: str
    limit: int
    interval_s: float
    concurrency: int = 0
    lease_ttl_s: float = 120.0
    tokens_limit: int | None = None

    @property
    def refill_per_s(self) -> float:
        return self.limit / self.interval_s


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to ``acquire``.

    ``limit``/``remaining``/``reset_s`` describe the constraint that decided
    (the concurrency limit when ``cause`` is concurrency); ``reset_s`` is the
    time until the bucket is full again, ``retry_after_s`` the time until
    this request would be admitted (0 when allowed).
    """

    allowed: bool
    cause: str | None
    limit: int
    remaining: int
    retry_after_s: float
    reset_s: float
    lease_id: str | None = None
    cost: int = 0
    token_reserve: int = 0


def invalid(rule: LimitRule) -> bool:
    """A rule without a positive limit and interval admits nothing."""
    return rule.limit <= 0 or rule.interval_s <= 0


def denied_invalid(rule: LimitRule) -> Decision:
    # Answered before any store is asked: keeps a division by zero out of the scripts.
    return Decision(
        allowed=False,
        cause=QUOTA,
        limit=max(0, rule.limit),
        remaining=0,
        retry_after_s=max(0.0, rule.interval_s),
        reset_s=max(0.0, rule.interval_s),
    )


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """Read-only view for GET /v1/limits."""

    limit: int
    remaining: int
    used: int
    reset_s: float
    in_flight: int
    tokens_limit: int | None = None
    tokens_remaining: int | None = None


class LimiterUnavailable(Exception):
    """The limiter's store could not answer in time (Redis down or slow)."""


@runtime_checkable
class Limiter(Protocol):
    async def acquire(self, rule: LimitRule, *, cost: int = 1, token_reserve: int = 0) -> Decision:
        """Reserve ``cost`` units and a lease (and ``token_reserve`` of the token quota)."""
        ...

    async def release(
        self,
        rule: LimitRule,
        decision: Decision,
        *,
        refund: bool,
        actual_cost: int | None = None,
        actual_tokens: int | None = None,
    ) -> None:
        """Free the lease; refund everything, or settle cost/tokens to the actual figures."""
        ...

    async def renew(self, rule: LimitRule, decision: Decision, ttl_s: float) -> bool:
        """Extend the decision's lease to expire no sooner than ``ttl_s`` from now.

        True when the lease is held until then; False when there is none to
        renew (no lease taken, released, expired) or the store cannot tell.
        Never shortens a lease, never brings an expired one back, never raises
        for a store outage.
        """
        ...

    async def status(self, rule: LimitRule) -> LimitStatus: ...

    async def reset(self, bucket: str, feature: str) -> None:
        """Forget usage (the reference's usage reset on a plan change)."""
        ...

    async def drain_releases(self, timeout_s: float = 5.0) -> int:
        """Wait (at most ``timeout_s``) for releases still running and flush queued ones.

        Call it at shutdown after the last requests ended and before ``close``
        (``close`` calls it too). Returns the releases that could not be sent.
        """
        ...

    async def close(self) -> None: ...


class InFlight:
    """Calls still running (releases waiting on Redis), and a way to wait until there are none.

    Shutdown waits for the releases of the last requests before it closes
    the connection they need.
    """

    __slots__ = ("count", "_idle")

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *_: object) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def wait(self, deadline: float) -> int:
        """Until none is running or the loop's clock reaches ``deadline``; returns how many still are."""
        if self.count:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._idle.wait()
            except TimeoutError:
                pass
        return self.count
