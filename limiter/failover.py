"""Keep admitting (or refuse fast) when Redis is down or slow.

Every call to the Redis limiter is bounded by ``timeout_s``. The first
failure starts an outage: one warning is logged, and until Redis answers a
PING again (probed in the background at most every ``probe_interval_s``)
no request waits on Redis:

* ``fail_open``: decisions come from the in-process fallback limiter (its
  limits then hold per gateway process, not across them);
* ``fail_closed``: ``LimiterUnavailable`` at once (the handler answers 503).

A decision is released where it was granted. Fallback grants carry their
origin in their type; a Redis grant whose release cannot reach Redis is
queued (bounded) and replayed when Redis is back, so its lease is freed
and its reservation refunded or settled there. A release that failed
*after* being sent may already have run: its replay accounts only if the
lease was still held, and one without a lease is dropped (counted), so a
replay never counts twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import TypeVar

from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from limiter.base import Decision, LimitRule, LimiterUnavailable, LimitStatus
from limiter.memory import MemoryLimiter
from limiter.redis_limiter import RedisLimiter

log = logging.getLogger(__name__)

FAIL_OPEN = "fail_open"
FAIL_CLOSED = "fail_closed"

# Redis errors (the cluster client's own exceptions are not RedisErrors),
# socket errors, and our own timeout (TimeoutError in 3.11).
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)

T = TypeVar("T")

# op ("acquire", "release", "status", "reset", "probe", "replay"), seconds, outcome ("ok", "error", "timeout")
CallObserver = Callable[[str, float, str], None]


@dataclass(frozen=True, slots=True)
class FallbackDecision(Decision):
    """A decision granted by the in-process fallback; released there."""


@dataclass(slots=True)
class FailoverStats:
    """Plain counters and gauges, read by the metrics collector."""

    outages: int = 0
    primary_errors: int = 0
    primary_timeouts: int = 0
    fallback_decisions: int = 0
    unavailable: int = 0
    releases_queued: int = 0
    releases_replayed: int = 0
    releases_dropped: int = 0
    pending_releases: int = 0
    in_outage: bool = False


@dataclass(frozen=True, slots=True)
class _PendingRelease:
    rule: LimitRule
    decision: Decision
    refund: bool
    actual_cost: int | None
    actual_tokens: int | None
    maybe_sent: bool


def _as_fallback(decision: Decision) -> FallbackDecision:
    return FallbackDecision(*(getattr(decision, f.name) for f in fields(Decision)))


class FailoverLimiter:
    def __init__(
        self,
        primary: RedisLimiter,
        fallback: MemoryLimiter,
        policy: str,
        timeout_s: float,
        *,
        probe_interval_s: float = 1.0,
        max_pending_releases: int = 10_000,
        observe: CallObserver | None = None,
    ) -> None:
        if policy not in (FAIL_OPEN, FAIL_CLOSED):
            raise ValueError(f"failure policy must be {FAIL_OPEN} or {FAIL_CLOSED}, not {policy!r}")
        self._primary = primary
        self._fallback = fallback
        self._policy = policy
        self._timeout_s = timeout_s
        self._probe_interval_s = probe_interval_s
        self._pending: deque[_PendingRelease] = deque()
        self._max_pending = max_pending_releases
        self._observe = observe
        self.stats = FailoverStats()
        self._outage_started = 0.0
        self._fallback_at_outage_start = 0
        self._next_probe = 0.0
        self._probe_task: asyncio.Task[None] | None = None
        self._replay_task: asyncio.Task[None] | None = None

    @property
    def policy(self) -> str:
        return self._policy

    async def health(self) -> dict[str, object]:
        """For /-/healthz: is Redis answering, and can the gateway serve without it?

        With fail_open a Redis outage degrades limits to per-process but the
        gateway still serves, so it stays healthy: a health check tied to Redis
        would take every process out of rotation at once.
        """
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._primary.ping(), self._timeout_s)
            up = True
        except Exception:
            up = False
        return {
            "ok": up or self._policy == FAIL_OPEN,
            "up": up,
            "policy": self._policy,
            "latency_ms": round((time.monotonic() - started) * 1000, 2),
            "in_outage": self.stats.in_outage,
            "pending_releases": self.stats.pending_releases,
        }

    @property
    def in_outage(self) -> bool:
        return self.stats.in_outage

    # -- outage bookkeeping -------------------------------------------------

    async def _call_primary(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one primary call under the timeout; start an outage if it fails."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await call()
        except (TimeoutError, RedisTimeoutError) as err:
            self.stats.primary_timeouts += 1
            self._emit(op, started, "timeout")
            self._start_outage(op, err)
            raise
        except _FAILURES as err:
            self.stats.primary_errors += 1
            self._emit(op, started, "error")
            self._start_outage(op, err)
            raise
        self._emit(op, started, "ok")
        return result

    def _emit(self, op: str, started: float, outcome: str) -> None:
        if self._observe is not None:
            self._observe(op, time.monotonic() - started, outcome)

    def _start_outage(self, op: str, err: BaseException) -> None:
        now = time.monotonic()
        self._next_probe = now + self._probe_interval_s
        if self.stats.in_outage:
            return
        self.stats.in_outage = True
        self.stats.outages += 1
        self._outage_started = now
        self._fallback_at_outage_start = self.stats.fallback_decisions
        action = "using the in-process limiter" if self._policy == FAIL_OPEN else "answering 503"
        log.warning(
            "Redis limiter unavailable (%s failed: %s); %s (%s) until Redis answers again",
            op, type(err).__name__ if not str(err) else f"{type(err).__name__}: {err}", action, self._policy,
        )

    def _end_outage(self) -> None:
        if not self.stats.in_outage:
            return
        self.stats.in_outage = False
        log.info(
            "Redis limiter is back after %.1fs (%d fallback decisions, %d releases to replay)",
            time.monotonic() - self._outage_started,
            self.stats.fallback_decisions - self._fallback_at_outage_start,
            len(self._pending),
        )
        if self._pending and (self._replay_task is None or self._replay_task.done()):
            self._replay_task = asyncio.create_task(self._replay())

    def _maybe_probe(self) -> None:
        """While in outage, ask Redis (in the background) at most once per probe interval."""
        now = time.monotonic()
        if now < self._next_probe or (self._probe_task is not None and not self._probe_task.done()):
            return
        self._next_probe = now + self._probe_interval_s
        self._probe_task = asyncio.create_task(self._probe())

    async def _probe(self) -> None:
        try:
            await self._call_primary("probe", self._primary.ping)
        except _FAILURES:
            return
        self._end_outage()

    def _unavailable(self) -> LimiterUnavailable:
        self.stats.unavailable += 1
        return LimiterUnavailable("rate limiter store unavailable")

    def _use_primary(self) -> bool:
        if not self.stats.in_outage:
            return True
        self._maybe_probe()
        return False

    # -- the Limiter protocol -------------------------------------------------

    async def acquire(self, rule: LimitRule, *, cost: int = 1, token_reserve: int = 0) -> Decision:
        if self._use_primary():
            try:
                return await self._call_primary(
                    "acquire", lambda: self._primary.acquire(rule, cost=cost, token_reserve=token_reserve)
                )
            except _FAILURES:
                pass
        if self._policy == FAIL_CLOSED:
            raise self._unavailable()
        self.stats.fallback_decisions += 1
        decision = await self._fallback.acquire(rule, cost=cost, token_reserve=token_reserve)
        return _as_fallback(decision)

    async def release(
        self,
        rule: LimitRule,
        decision: Decision,
        *,
        refund: bool,
        actual_cost: int | None = None,
        actual_tokens: int | None = None,
    ) -> None:
        """Never raises and never waits longer than ``timeout_s``: it runs in on_finish."""
        if not decision.allowed:
            return
        if isinstance(decision, FallbackDecision):
            await self._fallback.release(
                rule, decision, refund=refund, actual_cost=actual_cost, actual_tokens=actual_tokens
            )
            return
        if self._use_primary():
            try:
                await self._call_primary(
                    "release",
                    lambda: self._primary.release(
                        rule, decision, refund=refund, actual_cost=actual_cost, actual_tokens=actual_tokens
                    ),
                )
                return
            except _FAILURES:
                self._queue(_PendingRelease(rule, decision, refund, actual_cost, actual_tokens, True))
                return
        self._queue(_PendingRelease(rule, decision, refund, actual_cost, actual_tokens, False))

    def _queue(self, pending: _PendingRelease) -> None:
        if pending.maybe_sent and pending.decision.lease_id is None:
            # It may have run already and nothing can tell: counting it twice
            # would over-admit, so let it go.
            self.stats.releases_dropped += 1
            return
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.stats.releases_dropped += 1
        self._pending.append(pending)
        self.stats.releases_queued += 1
        self.stats.pending_releases = len(self._pending)

    async def _replay(self) -> None:
        while self._pending and not self.stats.in_outage:
            item = self._pending[0]
            try:
                await self._call_primary(
                    "replay",
                    lambda: self._primary.release(
                        item.rule,
                        item.decision,
                        refund=item.refund,
                        actual_cost=item.actual_cost,
                        actual_tokens=item.actual_tokens,
                        only_if_leased=item.maybe_sent,
                    ),
                )
            except _FAILURES:
                return
            if self._pending and self._pending[0] is item:
                self._pending.popleft()
            self.stats.releases_replayed += 1
            self.stats.pending_releases = len(self._pending)

    async def status(self, rule: LimitRule) -> LimitStatus:
        if self._use_primary():
            try:
                return await self._call_primary("status", lambda: self._primary.status(rule))
            except _FAILURES:
                pass
        if self._policy == FAIL_CLOSED:
            raise self._unavailable()
        return await self._fallback.status(rule)

    async def reset(self, bucket: str, feature: str) -> None:
        """Reset both stores; raises LimiterUnavailable if Redis could not be reset."""
        await self._fallback.reset(bucket, feature)
        if not self._use_primary():
            raise self._unavailable()
        try:
            await self._call_primary("reset", lambda: self._primary.reset(bucket, feature))
        except _FAILURES:
            raise self._unavailable() from None

    async def close(self) -> None:
        for task in (self._probe_task, self._replay_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        await self._primary.close()
        await self._fallback.close()
