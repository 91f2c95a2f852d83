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

An acquire whose answer never came (timeout, connection lost) may still
have run in Redis. Its lease id is chosen here before the call, so a
compensating release for that lease is queued: once Redis answers again the
lease is freed and its unit refunded if the acquire did run, and nothing
happens if it did not. Queued releases are sent before the outage ends, so
no request meets a lease left behind by the outage.

A script error (a ResponseError such as WRONGTYPE or a Lua error) is that
call's error: the call is answered by the policy (fallback or
LimiterUnavailable), a failed release still frees its lease, and no outage
starts. Errors that say the server as a whole cannot serve (BUSY, LOADING,
READONLY, OOM, CLUSTERDOWN, ...) start an outage as before.

At shutdown ``drain_releases`` (called by ``close`` too) waits for releases
still running and sends the queued ones, so a lease held by a request cut
at shutdown is freed now rather than at its expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import TypeVar

from redis.exceptions import (
    ClusterError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from limiter.base import (
    Decision,
    InFlight,
    LimiterUnavailable,
    LimitRule,
    LimitStatus,
    bounded_units,
)
from limiter.memory import MemoryLimiter
from limiter.redis_limiter import RedisLimiter

log = logging.getLogger(__name__)

FAIL_OPEN = "fail_open"
FAIL_CLOSED = "fail_closed"

# Redis errors (the cluster client's own exceptions are not RedisErrors),
# socket errors, and our own timeout (TimeoutError in 3.11).
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)

T = TypeVar("T")

# Error replies that describe the server, not the call: they start an outage.
_STORE_WIDE_REPLIES = (
    "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "LOADING", "READONLY", "OOM", "NOPERM", "NOAUTH",
    "MISCONF", "ERR max number of clients",
)
_STORE_WIDE_CLASSES = (ReadOnlyError, OutOfMemoryError, NoPermissionError, NoScriptError, ClusterError)
# Script errors are logged at most this often (a hostile input may repeat per request).
CALL_ERROR_LOG_INTERVAL_S = 10.0


def _maybe_sent(err: BaseException) -> bool:
    """Could the call that failed with ``err`` have run in Redis? Not if it failed to connect
    or was refused as a call of its own (script error: it stopped, its lease was never taken)."""
    if is_call_error(err):
        return False
    return "connecting to" not in str(err)


def is_call_error(err: BaseException) -> bool:
    """A reply error that concerns this one call (script error, WRONGTYPE), not Redis as a whole."""
    if not isinstance(err, ResponseError) or isinstance(err, _STORE_WIDE_CLASSES):
        return False
    return not str(err).startswith(_STORE_WIDE_REPLIES)

# Queued releases sent per pipelined batch when Redis is back.
_FLUSH_BATCH = 64

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
    # One call's own error (script error): answered by the policy, no outage.
    call_errors: int = 0
    # Acquires that got no answer; a compensating release was queued for their lease.
    leases_abandoned: int = 0
    # ... of which Redis did hold the lease (the acquire had run): freed and refunded.
    abandoned_leases_freed: int = 0
    # Compensations still waiting for Redis (not in pending_releases).
    pending_abandoned: int = 0
    # Releases of Redis grants that arrived after close(): nothing can send them.
    releases_after_close: int = 0


@dataclass(frozen=True, slots=True)
class _PendingRelease:
    rule: LimitRule
    decision: Decision
    refund: bool
    actual_cost: int | None
    actual_tokens: int | None
    maybe_sent: bool
    # A compensating release for an acquire that got no answer (decision is synthetic).
    abandoned: bool = False


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
        own = getattr(primary, "call_timeout_s", None)
        self._primary_bounded = isinstance(own, (int, float)) and 0 < own <= timeout_s
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
        self._flush_lock = asyncio.Lock()
        self._releases = InFlight()
        self._closed = False
        self._pending_abandoned = 0
        self._call_errors_logged_at = -CALL_ERROR_LOG_INTERVAL_S
        self._call_errors_unlogged = 0

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
            if self._primary_bounded:
                result = await call()
            else:
                async with asyncio.timeout(self._timeout_s):
                    result = await call()
        except (TimeoutError, RedisTimeoutError) as err:
            self.stats.primary_timeouts += 1
            self._emit(op, started, "timeout")
            self._start_outage(op, err)
            raise
        except ResponseError as err:
            if not is_call_error(err):
                self.stats.primary_errors += 1
                self._emit(op, started, "error")
                self._start_outage(op, err)
                raise
            self.stats.call_errors += 1
            self._emit(op, started, "error")
            self._log_call_error(op, err)
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

    def _log_call_error(self, op: str, err: BaseException) -> None:
        now = time.monotonic()
        if now - self._call_errors_logged_at < CALL_ERROR_LOG_INTERVAL_S:
            self._call_errors_unlogged += 1
            return
        self._call_errors_logged_at = now
        more = f" ({self._call_errors_unlogged} more since the last one logged)" if self._call_errors_unlogged else ""
        self._call_errors_unlogged = 0
        log.error("Redis limiter %s failed for this call only: %s: %s%s", op, type(err).__name__, err, more)

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
        # Leases left behind by the outage (releases that could not be sent,
        # acquires that got no answer) are freed before Redis decides again.
        if not await self._flush(len(self._pending)):
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
            lease_id = self._primary.new_lease_id(rule)
            try:
                return await self._call_primary(
                    "acquire",
                    lambda: self._primary.acquire(rule, cost=cost, token_reserve=token_reserve, lease_id=lease_id),
                )
            except _FAILURES as err:
                if lease_id is not None and _maybe_sent(err):
                    self._abandon(rule, lease_id, cost, token_reserve)
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
        if self._closed:
            self.stats.releases_after_close += 1
            log.debug("limiter release after close: lease %s expires on its own", decision.lease_id)
            return
        with self._releases:
            await self._release_on_primary(rule, decision, refund, actual_cost, actual_tokens)

    async def _release_on_primary(
        self,
        rule: LimitRule,
        decision: Decision,
        refund: bool,
        actual_cost: int | None,
        actual_tokens: int | None,
    ) -> None:
        if self._use_primary():
            try:
                await self._call_primary(
                    "release",
                    lambda: self._primary.release(
                        rule, decision, refund=refund, actual_cost=actual_cost, actual_tokens=actual_tokens
                    ),
                )
                return
            except ResponseError as err:
                if is_call_error(err):
                    await self._free_lease_only(rule, decision)
                    return
                self._queue(_PendingRelease(rule, decision, refund, actual_cost, actual_tokens, True))
                return
            except _FAILURES:
                self._queue(_PendingRelease(rule, decision, refund, actual_cost, actual_tokens, True))
                return
        self._queue(_PendingRelease(rule, decision, refund, actual_cost, actual_tokens, False))

    async def _free_lease_only(self, rule: LimitRule, decision: Decision) -> None:
        """A release whose script failed: still free its lease (without accounting)."""
        lease_id = decision.lease_id
        if lease_id is None:
            return
        try:
            await self._call_primary(
                "release", lambda: self._primary.abandon(rule, lease_id, cost=0, only_accounting=True)
            )
        except _FAILURES:
            pass

    def _abandon(self, rule: LimitRule, lease_id: str, cost: int, token_reserve: int) -> None:
        """Queue the compensating release of an acquire that got no answer."""
        self.stats.leases_abandoned += 1
        decision = Decision(
            allowed=True,
            cause=None,
            limit=rule.limit,
            remaining=0,
            retry_after_s=0.0,
            reset_s=0.0,
            lease_id=lease_id,
            cost=bounded_units(cost),
            token_reserve=bounded_units(token_reserve) if rule.tokens_limit is not None else 0,
        )
        self._queue(_PendingRelease(rule, decision, True, None, None, True, abandoned=True))
        if not self.stats.in_outage and (self._replay_task is None or self._replay_task.done()):
            # A call error on acquire starts no outage: send it as soon as possible.
            self._replay_task = asyncio.create_task(self._replay())

    def _queue(self, pending: _PendingRelease) -> None:
        if pending.maybe_sent and pending.decision.lease_id is None:
            # It may have run already and nothing can tell: counting it twice
            # would over-admit, so let it go.
            self.stats.releases_dropped += 1
            return
        if len(self._pending) >= self._max_pending:
            self._forget(self._pending.popleft())
            self.stats.releases_dropped += 1
        self._pending.append(pending)
        if pending.abandoned:
            self._pending_abandoned += 1
        else:
            self.stats.releases_queued += 1
        self._count_pending()

    def _forget(self, item: _PendingRelease) -> None:
        if item.abandoned:
            self._pending_abandoned -= 1

    def _count_pending(self) -> None:
        # The gauge counts releases of requests; compensations for unanswered acquires apart.
        self.stats.pending_releases = len(self._pending) - self._pending_abandoned
        self.stats.pending_abandoned = self._pending_abandoned

    async def _replay(self) -> None:
        while self._pending and not self.stats.in_outage and not self._closed:
            if not await self._flush(len(self._pending)):
                return

    async def _flush(self, count: int) -> bool:
        """Send up to ``count`` queued releases, in order, ``_FLUSH_BATCH`` at a time (pipelined).

        False when Redis failed (the failed ones go back to the front of the
        queue). A release whose script fails is dropped (counted): sending it
        again would fail again.
        """
        async with self._flush_lock:
            while count > 0 and self._pending:
                batch = [self._pending.popleft() for _ in range(min(count, _FLUSH_BATCH, len(self._pending)))]
                results = await asyncio.gather(*(self._send(item) for item in batch), return_exceptions=True)
                failed: list[_PendingRelease] = []
                for item, result in zip(batch, results):
                    if isinstance(result, BaseException) and not is_call_error(result):
                        failed.append(item)
                        continue
                    self._forget(item)
                    if isinstance(result, BaseException):
                        self.stats.releases_dropped += 1
                    elif item.abandoned:
                        if result:
                            self.stats.abandoned_leases_freed += 1
                    else:
                        self.stats.releases_replayed += 1
                self._pending.extendleft(reversed(failed))
                self._count_pending()
                if failed:
                    return False
                count -= len(batch)
            return True

    async def _send(self, item: _PendingRelease) -> bool:
        if item.abandoned:
            lease_id = item.decision.lease_id or ""
            return await self._call_primary(
                "replay",
                lambda: self._primary.abandon(
                    item.rule, lease_id, cost=item.decision.cost, token_reserve=item.decision.token_reserve
                ),
            )
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
        return True

    async def renew(self, rule: LimitRule, decision: Decision, ttl_s: float) -> bool:
        """Extend a lease where it was granted; False (never an exception) when Redis cannot answer.

        A renewal that fails is not queued: the caller renews periodically.
        """
        if not decision.allowed or decision.lease_id is None:
            return False
        if isinstance(decision, FallbackDecision):
            return await self._fallback.renew(rule, decision, ttl_s)
        if self._closed or not self._use_primary():
            return False
        try:
            return await self._call_primary("renew", lambda: self._primary.renew(rule, decision, ttl_s))
        except _FAILURES:
            return False

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

    async def drain_releases(self, timeout_s: float = 5.0) -> int:
        """Wait for releases still running, then send the queued ones; returns those left.

        For shutdown: call it once the last requests have ended (their releases
        spawned), before ``close``. Bounded by ``timeout_s`` overall; Redis still
        down means one failed call, not a wait.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        await asyncio.sleep(0)  # releases spawned just before start running
        await self._releases.wait(deadline)
        if self._pending:
            try:
                async with asyncio.timeout_at(deadline):
                    if await self._flush(len(self._pending)):
                        self._end_outage()
            except TimeoutError:
                pass
        left = len(self._pending) + self._releases.count
        if left:
            log.warning("limiter shutdown: %d releases could not reach Redis; their leases expire on their own", left)
        return left

    async def close(self, *, drain_timeout_s: float = 5.0) -> None:
        """Drain releases (``drain_releases``), then close both stores; later releases are counted."""
        if not self._closed:
            await self.drain_releases(drain_timeout_s)
        self._closed = True
        for task in (self._probe_task, self._replay_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        await self._primary.close()
        await self._fallback.close()
