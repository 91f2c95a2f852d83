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

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

QUOTA = "quota"
CONCURRENCY = "concurrency"
TOKENS = "tokens"


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

    async def status(self, rule: LimitRule) -> LimitStatus: ...

    async def reset(self, bucket: str, feature: str) -> None:
        """Forget usage (the reference's usage reset on a plan change)."""
        ...

    async def close(self) -> None: ...
