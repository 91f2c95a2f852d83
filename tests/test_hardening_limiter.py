"""Issue 17, limiter side: leases that must come back, bounded numbers, renewals, a safe connect.

* 4(a) an acquire that timed out on our side but ran in Redis gives its lease back once Redis
  answers again (not after the lease TTL);
* 4(b) releases still running or queued when the limiter shuts down are flushed first
  (``drain_releases``, and ``close`` drains);
* 7   numbers from outside (usage figures, costs) are bounded before they reach Redis, the Lua
  scripts survive absurd arguments, and one script error is that call's error, not an outage;
* 2   ``renew(rule, decision, ttl_s)`` keeps a running request's lease, on every store;
* 14  ``RespClient`` never writes to a transport that closed while it was connecting.

Real redis-server processes (tests/support/redis_servers.py); waits have deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis
import uvloop

from limiter import scripts
from limiter.base import CONCURRENCY, MAX_UNITS, QUOTA, Decision, Limiter, LimiterUnavailable, LimitRule
from limiter.failover import FAIL_CLOSED, FAIL_OPEN, FailoverLimiter, FallbackDecision
from limiter.memory import MemoryLimiter
from limiter.redis_limiter import RedisLimiter, bucket_keys
from redisconn.connect import connect
from redisconn.resp import RespAddress, RespClient
from tests.support.redis_servers import RedisServer, wait_until
from tests.test_limiter_contract import Backend, backend, wait_for  # noqa: F401  (backend: fixture)
from tests.test_limiter_contract import rule as contract_rule

pytestmark = pytest.mark.timeout(60)

FEATURE = "chat_completions"


def rule(**overrides: Any) -> LimitRule:
    """The contract suite's rule, with room for 100 admissions."""
    return contract_rule(**{"limit": 100, **overrides})


def run_on(backend: Backend, body: Callable[[Limiter], Awaitable[None]]) -> None:
    async def main() -> None:
        async with backend.open() as limiter:
            await body(limiter)

    asyncio.run(main())


@contextlib.asynccontextmanager
async def failover(
    server: RedisServer, policy: str, timeout_s: float = 0.25
) -> AsyncIterator[FailoverLimiter]:
    client = connect(server.url, timeout_ms=int(timeout_s * 1000), max_connections=8)
    limiter = FailoverLimiter(
        RedisLimiter(client, owns_client=True), MemoryLimiter(), policy, timeout_s, probe_interval_s=0.1
    )
    try:
        yield limiter
    finally:
        await limiter.close()


def lease_count(server: RedisServer, r: LimitRule) -> int:
    with contextlib.closing(server.client()) as conn:
        return int(conn.zcard(bucket_keys(r.bucket, r.feature)[2]))


# -- 4(a): an acquire that timed out on our side -----------------------------------------

BUSY_SCRIPT = """
local t = redis.call('TIME')
local until_us = (tonumber(t[1]) * 1000000 + tonumber(t[2])) + tonumber(ARGV[1]) * 1000
while true do
  t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) >= until_us then
    return 1
  end
end
"""


def busy_redis(server: RedisServer, ms: int) -> threading.Thread:
    """Keep Redis busy (one long script from another connection) for ``ms``; returns the thread."""

    def block() -> None:
        with contextlib.closing(server.client(timeout_s=ms / 1000 + 5)) as conn:
            conn.eval(BUSY_SCRIPT, 0, ms)

    thread = threading.Thread(target=block, daemon=True)
    thread.start()

    def blocked() -> bool:
        # A raw PING (redis-py would retry a timed-out one until Redis answers).
        with socket.create_connection(("127.0.0.1", server.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            sock.settimeout(0.05)
            try:
                return not sock.recv(16)
            except TimeoutError:
                return True

    wait_until(blocked, deadline_s=5, what="Redis to be busy")
    return thread


@pytest.mark.parametrize("policy", [FAIL_CLOSED, FAIL_OPEN])
def test_timed_out_acquire_that_ran_in_redis_gives_its_lease_back(redis_server_private: RedisServer, policy: str) -> None:
    server = redis_server_private

    async def main() -> None:
        async with failover(server, policy) as limiter:
            r = rule(concurrency=1, lease_ttl_s=600.0)
            warm = await limiter.acquire(r)
            assert warm.allowed and not isinstance(warm, FallbackDecision)
            await limiter.release(r, warm, refund=True)

            thread = await asyncio.to_thread(busy_redis, server, 1200)
            started = time.monotonic()
            if policy == FAIL_CLOSED:
                with pytest.raises(LimiterUnavailable):
                    await limiter.acquire(r)
            else:
                local = await limiter.acquire(r)
                assert isinstance(local, FallbackDecision)
                await limiter.release(r, local, refund=True)
            assert time.monotonic() - started < 1.0
            assert limiter.stats.primary_timeouts == 1
            await asyncio.to_thread(thread.join, 10)

            async def admitted_by_redis() -> bool:
                try:
                    d = await limiter.acquire(r)
                except LimiterUnavailable:
                    return False
                if d.allowed:
                    await limiter.release(r, d, refund=True)
                return d.allowed and not isinstance(d, FallbackDecision)

            # The acquire ran in Redis after we gave up on it (Redis ran it once unblocked):
            # before the fix its lease blocked this 1-concurrent actor for the whole TTL (600 s).
            took = await wait_for(admitted_by_redis, deadline_s=5, what="the abandoned lease to come back")
            print(f"\n[{policy}] abandoned lease back {took * 1000:.0f} ms after Redis answered; {limiter.stats}")
            assert limiter.stats.leases_abandoned == 1
            assert limiter.stats.abandoned_leases_freed == 1
            assert lease_count(server, r) == 0
            status = await limiter.status(r)
            assert status.in_flight == 0 and status.remaining == 100  # the unit it took is refunded too

    uvloop.run(main())


# -- 4(b): releases pending at shutdown ---------------------------------------------------


def test_close_runs_releases_still_in_flight(redis_server_private: RedisServer) -> None:
    server = redis_server_private
    r = rule(concurrency=1, lease_ttl_s=600.0)

    async def main() -> None:
        client = connect(server.url, timeout_ms=250, max_connections=8)
        limiter = FailoverLimiter(RedisLimiter(client, owns_client=True), MemoryLimiter(), FAIL_OPEN, 0.25)
        d = await limiter.acquire(r)
        assert d.allowed and lease_count(server, r) == 1
        # A stream cut by the drain timeout: its release is spawned (not awaited) by the
        # handler's on_finish, then the shutdown sequence closes the limiter.
        task = asyncio.ensure_future(limiter.release(r, d, refund=False))
        await limiter.close()
        await task

    uvloop.run(main())
    assert lease_count(server, r) == 0


def test_drain_releases_replays_the_queue_before_close(redis_server_private: RedisServer) -> None:
    server = redis_server_private
    r = rule(concurrency=2, lease_ttl_s=600.0)

    async def main() -> None:
        client = connect(server.url, timeout_ms=250, max_connections=8)
        # A probe interval far beyond the test: only the drain can replay the queue.
        limiter = FailoverLimiter(
            RedisLimiter(client, owns_client=True), MemoryLimiter(), FAIL_OPEN, 0.25, probe_interval_s=600
        )
        first, second = await limiter.acquire(r), await limiter.acquire(r)
        assert first.allowed and second.allowed and lease_count(server, r) == 2
        server.pause()
        try:
            await limiter.release(r, first, refund=False)  # times out after being sent
            await limiter.release(r, second, refund=True)  # refused up front: outage
        finally:
            server.resume()
        assert limiter.stats.pending_releases == 2
        left = await limiter.drain_releases(timeout_s=5)
        assert left == 0 and limiter.stats.pending_releases == 0
        await limiter.close()

    uvloop.run(main())
    assert lease_count(server, r) == 0


def test_release_after_close_is_counted_not_lost_silently(redis_server_private: RedisServer) -> None:
    async def main() -> None:
        client = connect(redis_server_private.url, timeout_ms=250, max_connections=8)
        limiter = FailoverLimiter(RedisLimiter(client, owns_client=True), MemoryLimiter(), FAIL_OPEN, 0.25)
        r = rule(concurrency=1)
        d = await limiter.acquire(r)
        await limiter.close()
        started = time.monotonic()
        await limiter.release(r, d, refund=False)  # neither raises nor waits
        assert time.monotonic() - started < 0.05
        assert limiter.stats.releases_after_close == 1

    uvloop.run(main())


# -- 7: numbers from outside are bounded; one script error is one call's error -------------

HUGE = 2**63 - 1


def test_absurd_usage_figures_leave_redis_healthy_under_fail_closed(redis_server_private: RedisServer) -> None:
    server = redis_server_private

    async def main() -> None:
        async with failover(server, FAIL_CLOSED, timeout_s=0.5) as limiter:
            hostile = rule(limit=1000, tokens_limit=100_000, concurrency=2)
            d = await limiter.acquire(hostile, cost=1, token_reserve=10)
            assert d.allowed
            await limiter.release(hostile, d, refund=False, actual_cost=HUGE, actual_tokens=HUGE)
            e = await limiter.acquire(hostile, cost=1)
            # (refused: the settle put it deep into debt) but never an error
            await limiter.release(hostile, e, refund=False, actual_cost=-HUGE, actual_tokens=-HUGE)
            assert not limiter.in_outage and limiter.stats.outages == 0
            assert limiter.stats.primary_errors == 0
            other = rule()
            admitted = await limiter.acquire(other)
            assert admitted.allowed and not isinstance(admitted, FallbackDecision)
            status = await limiter.status(hostile)
            assert status.in_flight == 0
            assert status.tokens_remaining == 0 and status.remaining == 0
            huge_cost = await limiter.acquire(rule(limit=HUGE, tokens_limit=HUGE), cost=HUGE, token_reserve=HUGE)
            assert huge_cost.cause in (None, QUOTA)
            assert not limiter.in_outage

        bucket_key, tokens_key, _ = bucket_keys(hostile.bucket, hostile.feature)
        with contextlib.closing(server.client()) as conn:
            for key in (bucket_key, tokens_key):
                ttl = int(conn.pttl(key))
                assert 0 < ttl <= scripts.MAX_TTL_MS, (key, ttl)
                level = float(conn.hget(key, "v") or 0)
                assert level >= -MAX_UNITS

    uvloop.run(main())


def test_scripts_themselves_survive_out_of_range_arguments(redis_server: RedisServer) -> None:
    """Whatever reaches the scripts (another client version, a bug), no PEXPIRE out of range."""
    r = rule(limit=5, tokens_limit=100, concurrency=1)
    keys = bucket_keys(r.bucket, r.feature)
    with contextlib.closing(redis_server.client()) as conn:
        allowed = conn.eval(scripts.ACQUIRE, 3, *keys, 5, "3600000", 1, 1, "1e30", "lease", 100, 10)
        assert allowed[0] == 1
        assert 0 < int(conn.pttl(keys[2])) <= scripts.MAX_TTL_MS
        result = conn.eval(
            scripts.RELEASE, 3, *keys, 5, "3600000", "lease", "settle", 1, str(HUGE), 100, 10, "1e300", "0"
        )
        assert result == [1, 1]
        for key in keys[:2]:
            assert 0 < int(conn.pttl(key)) <= scripts.MAX_TTL_MS
        denied = conn.eval(scripts.ACQUIRE, 3, *keys, 5, "0.001", str(HUGE), 0, "1000", "", 100, 0)
        assert denied[0] == 0 and all(abs(int(x)) <= scripts.MAX_TTL_MS for x in denied[4:6])
        assert conn.eval(scripts.STATUS, 3, *keys, 5, "3600000", 100)[2] <= scripts.MAX_TTL_MS
        assert conn.eval(scripts.ACQUIRE, 3, *keys, 5, "nan", "inf", 0, "1000", "", -1, 0)[0] in (0, 1)


def test_memory_twin_bounds_the_same_numbers() -> None:
    async def main() -> None:
        limiter = MemoryLimiter()
        hostile = rule(limit=1000, tokens_limit=100_000, concurrency=2)
        d = await limiter.acquire(hostile, token_reserve=10)
        await limiter.release(hostile, d, refund=False, actual_cost=HUGE, actual_tokens=HUGE)
        status = await limiter.status(hostile)
        assert status.remaining == 0 and status.tokens_remaining == 0 and status.in_flight == 0
        assert 0 < status.reset_s <= scripts.MAX_TTL_MS / 1000
        assert (await limiter.acquire(rule(limit=HUGE), cost=HUGE)).allowed in (True, False)
        nan_rule = rule(interval_s=float("nan"))
        assert not (await limiter.acquire(nan_rule)).allowed
        assert not (await limiter.acquire(rule(interval_s=float("inf")))).allowed

    asyncio.run(main())


def test_one_script_error_is_that_calls_error_not_an_outage(redis_server_private: RedisServer) -> None:
    server = redis_server_private

    async def main() -> None:
        async with failover(server, FAIL_CLOSED) as limiter:
            broken = rule(concurrency=2)
            granted = await limiter.acquire(broken)
            assert granted.allowed
            # A key of the wrong type under the actor's bucket: every script on it fails.
            with contextlib.closing(server.client()) as conn:
                conn.set(bucket_keys(broken.bucket, broken.feature)[0], "not a hash")
            with pytest.raises(LimiterUnavailable):
                await limiter.acquire(broken)
            await limiter.release(broken, granted, refund=False, actual_cost=3)  # settling touches the bucket
            assert not limiter.in_outage and limiter.stats.outages == 0
            assert limiter.stats.call_errors == 2
            # Unrelated actors are served by Redis as before (before the fix: 503 for everyone).
            for _ in range(5):
                other = await limiter.acquire(rule())
                assert other.allowed and not isinstance(other, FallbackDecision)
            # The failed settle still freed the lease.
            assert lease_count(server, broken) == 0

    uvloop.run(main())


# -- 2: renew a running request's lease -----------------------------------------------------


def test_renew_keeps_a_lease_past_its_first_ttl(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        renewed = rule(concurrency=1, lease_ttl_s=0.4)
        control = rule(concurrency=1, lease_ttl_s=0.4)
        d = await limiter.acquire(renewed)
        c = await limiter.acquire(control)
        assert d.allowed and c.allowed
        assert await limiter.renew(renewed, d, 30.0) is True

        async def control_expired() -> bool:
            again = await limiter.acquire(control)
            return again.allowed

        # The control lease expires at its TTL; the renewed one (taken at the same time) holds.
        await wait_for(control_expired, deadline_s=5, what="the control lease to expire")
        refused = await limiter.acquire(renewed)
        assert not refused.allowed and refused.cause == CONCURRENCY
        assert (await limiter.status(renewed)).in_flight == 1
        await limiter.release(renewed, d, refund=False)
        assert (await limiter.status(renewed)).in_flight == 0
        # A released lease is not brought back by a late renewal.
        assert await limiter.renew(renewed, d, 30.0) is False
        assert (await limiter.status(renewed)).in_flight == 0

    run_on(backend, body)


def test_renew_never_resurrects_an_expired_lease(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(concurrency=1, lease_ttl_s=0.2)
        d = await limiter.acquire(r)
        assert d.allowed

        async def expired() -> bool:
            return (await limiter.status(r)).in_flight == 0

        await wait_for(expired, deadline_s=5, what="the lease to expire")
        assert await limiter.renew(r, d, 30.0) is False
        other = await limiter.acquire(r)
        assert other.allowed  # the slot went to someone else; renewal did not take it back
        assert await limiter.renew(r, d, 30.0) is False
        assert (await limiter.status(r)).in_flight == 1
        # No lease at all: nothing to renew.
        free = rule()
        no_lease = await limiter.acquire(free)
        assert no_lease.allowed and no_lease.lease_id is None
        assert await limiter.renew(free, no_lease, 30.0) is False
        denied = Decision(allowed=False, cause=CONCURRENCY, limit=1, remaining=0, retry_after_s=1, reset_s=1)
        assert await limiter.renew(r, denied, 30.0) is False

    run_on(backend, body)


def test_renew_never_shortens_a_lease(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(concurrency=1, lease_ttl_s=30.0)
        control = rule(concurrency=1, lease_ttl_s=0.3)
        d = await limiter.acquire(r)
        c = await limiter.acquire(control)
        assert await limiter.renew(r, d, 0.05) is True

        async def control_expired() -> bool:
            return (await limiter.status(control)).in_flight == 0

        await wait_for(control_expired, deadline_s=5, what="the control lease to expire")
        assert (await limiter.status(r)).in_flight == 1
        assert c.allowed

    run_on(backend, body)


def test_failover_renew_goes_where_the_lease_lives(redis_server_private: RedisServer) -> None:
    server = redis_server_private

    async def main() -> None:
        async with failover(server, FAIL_OPEN) as limiter:
            r = rule(concurrency=2, lease_ttl_s=600.0)
            on_redis = await limiter.acquire(r)
            assert await limiter.renew(r, on_redis, 900.0) is True
            with contextlib.closing(server.client()) as conn:
                key = bucket_keys(r.bucket, r.feature)[2]
                assert int(conn.pttl(key)) > 600_000
            server.pause()
            try:
                started = time.monotonic()
                assert await limiter.renew(r, on_redis, 900.0) is False  # unknown: never raises
                assert time.monotonic() - started < 0.5
                local = await limiter.acquire(r)
                assert isinstance(local, FallbackDecision)
                assert await limiter.renew(r, local, 900.0) is True
            finally:
                server.resume()

    uvloop.run(main())


# -- 14: a transport that closes while the client connects -----------------------------------


class _LoopView:
    """The running loop, except that ``create_connection`` returns only once the server's
    reset has closed the new transport: the interleaving seen in Redis fault runs, made certain."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    async def create_connection(self, factory: Any, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await self._loop.create_connection(factory, *args, **kwargs)
        deadline = time.monotonic() + 5
        while not protocol.closed:
            assert time.monotonic() < deadline, "the server's reset never arrived"
            await asyncio.sleep(0.005)
        return transport, protocol


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_connect_to_a_transport_closed_during_connect(loop: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)

    async def main() -> None:
        running = asyncio.get_running_loop()
        unhandled: list[dict[str, Any]] = []
        running.set_exception_handler(lambda _loop, context: unhandled.append(context))

        async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

        server = await asyncio.start_server(reset, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = RespClient(RespAddress(host="127.0.0.1", port=port), timeout_s=3.0)
        client._loop = _LoopView(running)  # type: ignore[assignment]
        try:
            started = time.monotonic()
            with pytest.raises(redis.ConnectionError):
                await asyncio.wait_for(client.execute("PING"), 5)
            # Failed at once, not after the call's 3 s timeout.
            assert time.monotonic() - started < 1.0
            await client.close()
        finally:
            server.close()
            await server.wait_closed()
        import gc

        gc.collect()
        await asyncio.sleep(0)
        assert unhandled == [], [str(c.get("exception") or c.get("message")) for c in unhandled]

    if loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage() or "RuntimeError" in r.getMessage()]
