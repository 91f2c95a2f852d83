"""One contract suite for every limiter: in-process, Redis, and Redis Cluster.

The single-Redis backend runs through the limiter's own RESP2 client
(redisconn/resp.py, which RedisLimiter builds from the redis-py client it is
given); the cluster backend through redis-py's cluster client.

Real redis-server processes (tests/support/redis_servers.py), no mocks.
Time-based checks use small intervals and wait for conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from limiter.base import CONCURRENCY, QUOTA, TOKENS, Decision, Limiter, LimiterUnavailable, LimitRule
from limiter.failover import FAIL_CLOSED, FAIL_OPEN, FailoverLimiter, FallbackDecision
from limiter.memory import MemoryLimiter
from limiter.redis_limiter import RedisLimiter, bucket_keys
from redisconn.connect import connect
from tests.support.redis_servers import RedisClusterServers, RedisServer

REPO = Path(__file__).resolve().parents[1]
FEATURE = "chat_completions"

pytestmark = pytest.mark.timeout(60)


@dataclass
class Backend:
    name: str
    url: str | None = None
    servers: RedisServer | RedisClusterServers | None = None

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Limiter]:
        if self.url is None:
            memory = MemoryLimiter()
            yield memory
            await memory.close()
            return
        client = connect(self.url, timeout_ms=2000, max_connections=32)
        limiter = RedisLimiter(client, owns_client=True)
        try:
            yield limiter
        finally:
            await limiter.close()

    def node_clients(self) -> list[redis.Redis]:
        if isinstance(self.servers, RedisClusterServers):
            return [node.client() for node in self.servers.nodes]
        assert isinstance(self.servers, RedisServer)
        return [self.servers.client()]

    def keys(self) -> dict[str, int]:
        """Every key on every node -> the node's index."""
        found: dict[str, int] = {}
        for index, client in enumerate(self.node_clients()):
            with contextlib.closing(client):
                for key in client.scan_iter(match="*"):
                    found[key.decode()] = index
        return found

    def pttl(self, key: str) -> int:
        node = self.keys().get(key)
        if node is None:
            return -2
        clients = self.node_clients()
        try:
            return int(clients[node].pttl(key))
        finally:
            for client in clients:
                client.close()


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory")
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return Backend("redis", server.url, server)
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    return Backend("cluster", cluster.url, cluster)


@pytest.fixture(params=["redis", "cluster"])
def redis_backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return Backend("redis", server.url, server)
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    return Backend("cluster", cluster.url, cluster)


def rule(**overrides: Any) -> LimitRule:
    fields: dict[str, Any] = {
        "bucket": "actor-" + uuid.uuid4().hex[:8],
        "feature": FEATURE,
        "limit": 50,
        "interval_s": 3600.0,
    }
    fields.update(overrides)
    return LimitRule(**fields)


def run(backend: Backend, body: Callable[[Limiter], Awaitable[None]]) -> None:
    async def main() -> None:
        async with backend.open() as limiter:
            await body(limiter)

    asyncio.run(main())


async def wait_for(condition: Callable[[], Awaitable[bool]], *, deadline_s: float, what: str) -> float:
    """Poll an async condition; return the seconds it took; fail after the deadline."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > deadline_s:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


# -- admission ---------------------------------------------------------------


def test_exact_admission_under_concurrency(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=50)
        started = time.monotonic()
        decisions = await asyncio.gather(*(limiter.acquire(r) for _ in range(300)))
        elapsed = time.monotonic() - started
        allowed = [d for d in decisions if d.allowed]
        print(f"\n[{backend.name}] 300 concurrent acquires, limit 50: {len(allowed)} allowed in {elapsed * 1000:.0f} ms")
        assert len(allowed) == 50
        assert {d.cause for d in decisions if not d.allowed} == {QUOTA}
        assert sorted(d.remaining for d in allowed) == list(range(50))
        assert (await limiter.status(r)).remaining == 0

    run(backend, body)


def test_exact_concurrency_admission(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=10_000, concurrency=7)
        decisions = await asyncio.gather(*(limiter.acquire(r) for _ in range(200)))
        allowed = [d for d in decisions if d.allowed]
        print(f"\n[{backend.name}] 200 concurrent acquires, concurrency 7: {len(allowed)} allowed")
        assert len(allowed) == 7
        assert len({d.lease_id for d in allowed}) == 7
        denied = [d for d in decisions if not d.allowed]
        assert {d.cause for d in denied} == {CONCURRENCY}
        assert all(d.limit == 7 and d.remaining == 0 and d.retry_after_s == 1.0 for d in denied)
        assert (await limiter.status(r)).in_flight == 7
        # Denied requests took nothing from the bucket.
        assert (await limiter.status(r)).remaining == 10_000 - 7
        await asyncio.gather(*(limiter.release(r, d, refund=False) for d in allowed))
        assert (await limiter.status(r)).in_flight == 0
        again = await asyncio.gather(*(limiter.acquire(r) for _ in range(20)))
        assert sum(d.allowed for d in again) == 7

    run(backend, body)


def test_concurrency_limit_of_one(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=100, concurrency=1)
        first = await limiter.acquire(r)
        assert first.allowed and first.lease_id
        second = await limiter.acquire(r)
        assert not second.allowed and second.cause == CONCURRENCY and second.limit == 1
        await limiter.release(r, first, refund=False)
        third = await limiter.acquire(r)
        assert third.allowed
        await limiter.release(r, third, refund=True)
        status = await limiter.status(r)
        assert status.in_flight == 0 and status.remaining == 99

    run(backend, body)


def test_denied_decision_release_is_a_no_op(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=1)
        granted = await limiter.acquire(r)
        denied = await limiter.acquire(r)
        assert granted.allowed and not denied.allowed
        await limiter.release(r, denied, refund=True)
        assert (await limiter.status(r)).remaining == 0

    run(backend, body)


def test_invalid_rule_denies_without_error(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        for bad in (rule(limit=0), rule(interval_s=0.0)):
            decision = await limiter.acquire(bad)
            assert not decision.allowed and decision.cause == QUOTA
            await limiter.release(bad, decision, refund=True)
            assert (await limiter.status(bad)).remaining == 0

    run(backend, body)


# -- refill, refund, settle -------------------------------------------------------


def test_refill_over_time(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=5, interval_s=1.0)  # one unit every 200 ms
        assert all([(await limiter.acquire(r)).allowed for _ in range(5)])
        denied = await limiter.acquire(r)
        assert not denied.allowed and denied.cause == QUOTA and denied.remaining == 0
        assert 0.0 < denied.retry_after_s <= 0.2 + 1e-3
        assert 0.8 <= denied.reset_s <= 1.0 + 1e-3

        async def admitted() -> bool:
            return (await limiter.acquire(r)).allowed

        waited = await wait_for(admitted, deadline_s=3.0, what="a refilled unit")
        print(f"\n[{backend.name}] refill: retry_after {denied.retry_after_s:.3f}s, admitted after {waited:.3f}s")
        assert waited >= denied.retry_after_s - 0.06

        async def full() -> bool:
            return (await limiter.status(r)).remaining == 5

        await wait_for(full, deadline_s=3.0, what="a full bucket")

    run(backend, body)


def test_refund_on_non_2xx(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=3)
        decisions = [await limiter.acquire(r) for _ in range(3)]
        assert all(d.allowed for d in decisions)
        assert not (await limiter.acquire(r)).allowed
        await limiter.release(r, decisions[0], refund=True)
        assert (await limiter.status(r)).remaining == 1
        assert (await limiter.acquire(r)).allowed
        # A refund never lifts a bucket above its capacity.
        for d in decisions[1:]:
            await limiter.release(r, d, refund=True)
        await limiter.release(r, decisions[0], refund=True)
        assert (await limiter.status(r)).remaining == 3

    run(backend, body)


def test_settle_up_and_down(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(feature="embeddings", limit=1000)
        estimate = await limiter.acquire(r, cost=300)
        assert estimate.allowed and estimate.remaining == 700 and estimate.cost == 300
        await limiter.release(r, estimate, refund=False, actual_cost=100)
        assert (await limiter.status(r)).remaining == 900
        under = await limiter.acquire(r, cost=200)
        await limiter.release(r, under, refund=False, actual_cost=900)
        status = await limiter.status(r)
        assert status.remaining == 0 and status.used == 1000
        assert not (await limiter.acquire(r, cost=1)).allowed

        # An under-estimate may take the bucket below zero: it is paid back by waiting.
        small = rule(feature="embeddings", limit=100)
        d = await limiter.acquire(small, cost=80)
        await limiter.release(small, d, refund=False, actual_cost=250)
        status = await limiter.status(small)
        assert status.remaining == 0 and status.used == 250
        denied = await limiter.acquire(small, cost=1)
        rate = 100 / 3600
        assert not denied.allowed and denied.cause == QUOTA and denied.remaining == 0
        assert denied.retry_after_s == pytest.approx(151 / rate, rel=0.01)
        assert denied.reset_s == pytest.approx(250 / rate, rel=0.01)

    run(backend, body)


def test_burst_of_large_reservations_never_exceeds_quota(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(feature="embeddings", limit=10_000)
        decisions = await asyncio.gather(*(limiter.acquire(r, cost=1_000) for _ in range(60)))
        allowed = [d for d in decisions if d.allowed]
        print(f"\n[{backend.name}] 60 concurrent reservations of 1000 against 10000: {len(allowed)} allowed")
        assert len(allowed) == 10
        assert sum(d.cost for d in allowed) == 10_000
        assert (await limiter.status(r)).remaining == 0

    run(backend, body)


def test_token_quota(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=100, tokens_limit=1000)
        first = await limiter.acquire(r, token_reserve=600)
        assert first.allowed and first.token_reserve == 600
        second = await limiter.acquire(r, token_reserve=600)
        assert not second.allowed and second.cause == TOKENS
        assert second.limit == 1000 and second.remaining == 400 and second.retry_after_s > 0
        # The refused request took nothing from the request bucket either.
        assert (await limiter.status(r)).remaining == 99
        await limiter.release(r, first, refund=False, actual_tokens=100)
        status = await limiter.status(r)
        assert status.tokens_limit == 1000 and status.tokens_remaining == 900
        third = await limiter.acquire(r, token_reserve=600)
        assert third.allowed
        assert (await limiter.status(r)).tokens_remaining == 300
        await limiter.release(r, third, refund=True)
        assert (await limiter.status(r)).tokens_remaining == 900

        # Settling above the reservation can exhaust the quota: then even a
        # request reserving nothing waits for at least one token.
        big = await limiter.acquire(r, token_reserve=10)
        await limiter.release(r, big, refund=False, actual_tokens=5000)
        assert (await limiter.status(r)).tokens_remaining == 0
        blocked = await limiter.acquire(r, token_reserve=0)
        assert not blocked.allowed and blocked.cause == TOKENS

        burst_rule = rule(limit=1000, tokens_limit=3000)
        burst = await asyncio.gather(*(limiter.acquire(burst_rule, token_reserve=300) for _ in range(50)))
        assert sum(d.allowed for d in burst) == 10
        assert (await limiter.status(burst_rule)).remaining == 990

    run(backend, body)


def test_no_token_quota_means_no_token_reserve(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=10)
        d = await limiter.acquire(r, token_reserve=5000)
        assert d.allowed and d.token_reserve == 0
        status = await limiter.status(r)
        assert status.tokens_limit is None and status.tokens_remaining is None

    run(backend, body)


# -- leases ------------------------------------------------------------------


def test_lease_expires_when_not_released(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=100, concurrency=1, lease_ttl_s=0.3)
        held = await limiter.acquire(r)
        assert held.allowed
        denied = await limiter.acquire(r)
        assert not denied.allowed and denied.cause == CONCURRENCY
        assert 0.0 < denied.reset_s <= 0.3 + 1e-3

        async def admitted() -> bool:
            return (await limiter.acquire(r)).allowed

        waited = await wait_for(admitted, deadline_s=3.0, what="the lease to expire")
        print(f"\n[{backend.name}] lease ttl 0.3s came back after {waited:.3f}s")
        assert waited >= 0.15
        # Releasing the expired lease late is harmless and still settles.
        await limiter.release(r, held, refund=True)
        assert (await limiter.status(r)).in_flight == 1

    run(backend, body)


def test_reset_forgets_usage_but_keeps_leases(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=3, concurrency=2)
        a = await limiter.acquire(r)
        b = await limiter.acquire(r)
        assert a.allowed and b.allowed
        await limiter.reset(r.bucket, r.feature)
        status = await limiter.status(r)
        assert status.remaining == 3 and status.used == 0 and status.in_flight == 2
        assert (await limiter.acquire(r)).cause == CONCURRENCY
        await limiter.release(r, a, refund=False)
        c = await limiter.acquire(r)
        assert c.allowed and c.remaining == 2
        await limiter.release(r, b, refund=True)
        assert (await limiter.status(r)).remaining == 3

    run(backend, body)


# -- reported figures ----------------------------------------------------------------


def test_remaining_reset_and_retry_after_are_sane(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=10, interval_s=10.0)
        decisions = [await limiter.acquire(r) for _ in range(4)]
        last = decisions[-1]
        assert [d.remaining for d in decisions] == [9, 8, 7, 6]
        assert last.limit == 10 and last.retry_after_s == 0.0
        assert 3.7 <= last.reset_s <= 4.0 + 1e-3
        status = await limiter.status(r)
        assert (status.limit, status.remaining, status.used) == (10, 6, 4)
        assert 3.5 <= status.reset_s <= 4.0 + 1e-3
        assert status.in_flight == 0
        for _ in range(6):
            assert (await limiter.acquire(r)).allowed
        denied = await limiter.acquire(r)
        assert not denied.allowed and denied.limit == 10 and denied.remaining == 0
        assert 0.5 < denied.retry_after_s <= 1.0 + 1e-3
        assert 9.0 < denied.reset_s <= 10.0 + 1e-3

    run(backend, body)


def test_status_does_not_create_state(backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=7, concurrency=2, tokens_limit=70)
        status = await limiter.status(r)
        assert (status.remaining, status.used, status.in_flight, status.tokens_remaining) == (7, 0, 0, 70)
        assert status.reset_s == 0.0
        if isinstance(limiter, MemoryLimiter):
            assert len(limiter) == 0
        else:
            assert backend.keys() == {}

    run(backend, body)


def test_memory_limiter_forgets_idle_full_buckets() -> None:
    now = [1_000.0]
    limiter = MemoryLimiter(clock=lambda: now[0])

    async def main() -> None:
        idle = rule(limit=10, interval_s=10.0)
        busy = rule(limit=10, interval_s=10.0, concurrency=2, lease_ttl_s=1_000.0)
        await limiter.acquire(idle, cost=5)
        await limiter.acquire(busy)
        assert len(limiter) == 2
        now[0] += 61.0  # past the sweep interval; the idle bucket is full again
        await limiter.acquire(rule(limit=10))
        # The idle bucket is gone; the busy one (it holds a lease) and the new one remain.
        assert len(limiter) == 2
        assert (await limiter.status(busy)).in_flight == 1
        assert (await limiter.status(idle)).remaining == 10

    asyncio.run(main())


# -- Redis only ----------------------------------------------------------------


def test_noscript_reload_after_script_flush(redis_backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        assert isinstance(limiter, RedisLimiter)
        r = rule(limit=10, concurrency=3)
        await limiter.load_scripts()
        first = await limiter.acquire(r)
        assert first.allowed
        assert redis_backend.servers is not None
        redis_backend.servers.script_flush()
        loads_before = limiter.stats.script_loads
        decisions = await asyncio.gather(*(limiter.acquire(r) for _ in range(5)))
        assert sum(d.allowed for d in decisions) == 2
        assert limiter.stats.noscript_replies >= 1
        # Concurrent NOSCRIPT replies load the script once, not once per call.
        assert limiter.stats.script_loads == loads_before + 1
        await limiter.release(r, first, refund=True)
        assert (await limiter.status(r)).in_flight == 2

    run(redis_backend, body)


@pytest.mark.parametrize("actor_id", ["actor-plain", "we{ir}d:actor}{"])
def test_bucket_keys_share_one_slot(redis_backend: Backend, actor_id: str) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(bucket=actor_id, limit=10, concurrency=2, tokens_limit=100)
        assert (await limiter.acquire(r, token_reserve=10)).allowed
        expected = set(bucket_keys(actor_id, FEATURE))
        assert expected == {
            f"rate_limit:{{{FEATURE}:{actor_id}}}:bucket",
            f"rate_limit:{{{FEATURE}:{actor_id}}}:tokens",
            f"rate_limit:concurrent:{{{FEATURE}:{actor_id}}}",
        }
        keys = redis_backend.keys()
        assert set(keys) == expected
        assert len({key_slot(k.encode()) for k in keys}) == 1
        assert len(set(keys.values())) == 1  # on one node of the cluster

    run(redis_backend, body)


def test_idle_keys_expire(redis_backend: Backend) -> None:
    async def body(limiter: Limiter) -> None:
        r = rule(limit=10, interval_s=100.0, concurrency=2, lease_ttl_s=30.0, tokens_limit=1000)
        bucket_key, tokens_key, leases_key = bucket_keys(r.bucket, r.feature)
        d = await limiter.acquire(r, cost=3, token_reserve=100)
        # 3 units at 0.1/s: full again in 30 s, plus 1 s of slack.
        assert 30_000 < redis_backend.pttl(bucket_key) <= 31_000
        assert 9_000 < redis_backend.pttl(tokens_key) <= 11_000
        assert 29_000 < redis_backend.pttl(leases_key) <= 30_000
        # A bucket refunded back to full needs no key at all.
        await limiter.release(r, d, refund=True)
        assert redis_backend.keys() == {}

    run(redis_backend, body)


@pytest.mark.timeout(90)
def test_two_processes_share_one_limit(redis_backend: Backend) -> None:
    """Two gateway-like processes, each with its own client and event loop."""
    assert redis_backend.url is not None
    bucket = "actor-" + uuid.uuid4().hex[:8]
    barrier = "test-barrier-" + bucket
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from limiter.base import LimitRule
        from redisconn.connect import connect
        from limiter.redis_limiter import RedisLimiter

        async def main():
            client = connect({redis_backend.url!r}, timeout_ms=5000, max_connections=32)
            limiter = RedisLimiter(client)
            rule = LimitRule(bucket={bucket!r}, feature="chat_completions", limit=50, interval_s=3600.0)
            await limiter.load_scripts()
            # Start together: both processes check in, then both go.
            await client.incr({barrier!r})
            deadline = time.monotonic() + 20
            while int(await client.get({barrier!r}) or 0) < 2:
                if time.monotonic() > deadline:
                    raise SystemExit("barrier timeout")
                await asyncio.sleep(0.005)
            decisions = await asyncio.gather(*(limiter.acquire(rule) for _ in range(200)))
            print(json.dumps({{"allowed": sum(d.allowed for d in decisions)}}))
            await client.aclose()

        asyncio.run(main())
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()[-2000:]
            results.append(json.loads(out.decode().strip().splitlines()[-1])["allowed"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"\n[{redis_backend.name}] two processes x 200 concurrent acquires, limit 50: allowed {results}")
    assert sum(results) == 50


# -- failover ----------------------------------------------------------------------


@dataclass
class FailoverRig:
    server: RedisServer
    limiter: FailoverLimiter
    fallback: MemoryLimiter


@contextlib.asynccontextmanager
async def failover_rig(server: RedisServer, policy: str, timeout_s: float = 0.3) -> AsyncIterator[FailoverRig]:
    client = connect(server.url, timeout_ms=int(timeout_s * 1000), max_connections=32)
    fallback = MemoryLimiter()
    limiter = FailoverLimiter(RedisLimiter(client), fallback, policy, timeout_s, probe_interval_s=0.2)
    try:
        yield FailoverRig(server, limiter, fallback)
    finally:
        await limiter.close()
        await client.aclose()


def outage_logs(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    records = [r for r in caplog.records if r.name == "limiter.failover"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    return warnings, infos


@pytest.mark.timeout(60)
def test_fail_open_keeps_admitting_through_an_outage(
    redis_server_private: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="limiter.failover")

    async def main() -> None:
        async with failover_rig(redis_server_private, FAIL_OPEN) as rig:
            limiter = rig.limiter
            r = rule(limit=1_000_000, concurrency=50)
            latencies: list[float] = []
            outcomes: list[Decision] = []
            stop = asyncio.Event()

            async def worker() -> None:
                while not stop.is_set():
                    started = time.monotonic()
                    d = await limiter.acquire(r)
                    await limiter.release(r, d, refund=False)
                    latencies.append(time.monotonic() - started)
                    outcomes.append(d)
                    await asyncio.sleep(0.002)

            workers = [asyncio.create_task(worker()) for _ in range(10)]

            def progressed(n: int) -> Callable[[], Awaitable[bool]]:
                target = len(outcomes) + n

                async def check() -> bool:
                    return len(outcomes) >= target

                return check

            await wait_for(progressed(50), deadline_s=10, what="traffic through Redis")
            assert not limiter.in_outage and limiter.stats.fallback_decisions == 0

            await asyncio.to_thread(rig.server.stop)
            await wait_for(progressed(200), deadline_s=10, what="traffic during the outage")
            assert limiter.in_outage and limiter.stats.outages == 1
            assert limiter.stats.fallback_decisions > 0
            during = outcomes[-100:]
            assert all(d.allowed and isinstance(d, FallbackDecision) for d in during)

            await asyncio.to_thread(rig.server.start)

            async def recovered() -> bool:
                return not limiter.in_outage

            await wait_for(recovered, deadline_s=10, what="the limiter to return to Redis")
            await wait_for(progressed(50), deadline_s=10, what="traffic after recovery")
            stop.set()
            await asyncio.gather(*workers)
            assert all(not isinstance(d, FallbackDecision) for d in outcomes[-20:])
            assert (await limiter.status(r)).in_flight == 0
            print(
                f"\n[fail_open] {len(outcomes)} decisions, {limiter.stats.fallback_decisions} from the fallback, "
                f"max acquire+release latency {max(latencies) * 1000:.0f} ms, stats {limiter.stats}"
            )
            # One timeout at most per call; never a hang.
            assert max(latencies) < 2 * 0.3 + 0.5

    asyncio.run(main())
    warnings, infos = outage_logs(caplog)
    assert len(warnings) == 1 and "unavailable" in warnings[0]
    assert len(infos) == 1 and "back" in infos[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("failure", ["stopped", "frozen"])
def test_fail_closed_raises_fast_and_recovers(
    redis_server_private: RedisServer, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    caplog.set_level(logging.INFO, logger="limiter.failover")
    timeout_s = 0.3

    async def main() -> None:
        async with failover_rig(redis_server_private, FAIL_CLOSED, timeout_s) as rig:
            limiter = rig.limiter
            r = rule(limit=100, concurrency=5)
            granted = await limiter.acquire(r)
            assert granted.allowed
            if failure == "stopped":
                await asyncio.to_thread(rig.server.stop)
            else:
                rig.server.pause()  # connections hang: only the timeout can end a call

            started = time.monotonic()
            with pytest.raises(LimiterUnavailable):
                await limiter.acquire(r)
            first = time.monotonic() - started
            started = time.monotonic()
            for _ in range(20):
                with pytest.raises(LimiterUnavailable):
                    await limiter.acquire(r)
            following = (time.monotonic() - started) / 20
            with pytest.raises(LimiterUnavailable):
                await limiter.status(r)
            print(f"\n[fail_closed/{failure}] first refusal {first * 1000:.0f} ms, then {following * 1000:.2f} ms each")
            assert first < timeout_s + 0.3
            assert following < 0.05
            assert limiter.stats.unavailable >= 21 and limiter.stats.outages == 1
            # Releasing during the outage neither raises nor waits: it is queued for Redis.
            started = time.monotonic()
            await limiter.release(r, granted, refund=True)
            assert time.monotonic() - started < 0.05
            assert limiter.stats.pending_releases == 1

            if failure == "stopped":
                await asyncio.to_thread(rig.server.start)
            else:
                rig.server.resume()

            async def admitted() -> bool:
                try:
                    return (await limiter.acquire(r)).allowed
                except LimiterUnavailable:
                    return False

            await wait_for(admitted, deadline_s=10, what="Redis to come back")
            assert not limiter.in_outage

    asyncio.run(main())
    warnings, infos = outage_logs(caplog)
    assert len(warnings) == 1 and len(infos) == 1


@pytest.mark.timeout(60)
def test_release_goes_to_the_limiter_that_granted(redis_server_private: RedisServer) -> None:
    async def main() -> None:
        async with failover_rig(redis_server_private, FAIL_OPEN) as rig:
            limiter = rig.limiter
            r = rule(limit=10, concurrency=2)
            from_redis = [await limiter.acquire(r) for _ in range(2)]
            assert all(d.allowed and not isinstance(d, FallbackDecision) for d in from_redis)

            rig.server.pause()
            # Fails after being sent: replayed only if the lease is still held.
            await limiter.release(r, from_redis[0], refund=True)
            assert limiter.in_outage
            # Refused up front during the outage: replayed as is.
            await limiter.release(r, from_redis[1], refund=True)
            assert limiter.stats.pending_releases == 2
            local = await limiter.acquire(r)
            assert local.allowed and isinstance(local, FallbackDecision)
            await limiter.release(r, local, refund=True)
            assert (await rig.fallback.status(r)).in_flight == 0
            rig.server.resume()

            async def replayed() -> bool:
                if limiter.in_outage:
                    await limiter.acquire(rule())  # traffic drives the probe
                return limiter.stats.pending_releases == 0 and not limiter.in_outage

            await wait_for(replayed, deadline_s=10, what="the pending releases to replay")
            assert limiter.stats.releases_replayed == 2 and limiter.stats.releases_dropped == 0
            status = await limiter.status(r)
            assert status.in_flight == 0 and status.remaining == 10

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_cluster_node_outage_and_return(
    redis_cluster_private: RedisClusterServers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="limiter.failover")
    cluster = redis_cluster_private
    r = rule(limit=1000, concurrency=5)
    node = cluster.node_for(bucket_keys(r.bucket, r.feature)[0])

    async def main() -> None:
        client = connect(cluster.url, timeout_ms=300, max_connections=16)
        fallback = MemoryLimiter()
        limiter = FailoverLimiter(RedisLimiter(client), fallback, FAIL_OPEN, 0.3, probe_interval_s=0.2)
        try:
            first = await limiter.acquire(r)
            assert first.allowed and not isinstance(first, FallbackDecision)
            await limiter.release(r, first, refund=True)

            await asyncio.to_thread(node.stop)
            started = time.monotonic()
            during = []
            for _ in range(20):
                d = await limiter.acquire(r)
                await limiter.release(r, d, refund=True)
                during.append(d)
            elapsed = time.monotonic() - started
            print(f"\n[cluster] slot owner down: 20 requests in {elapsed * 1000:.0f} ms, stats {limiter.stats}")
            assert all(d.allowed and isinstance(d, FallbackDecision) for d in during)
            assert elapsed < 1.5

            await asyncio.to_thread(node.start)  # same port: it rejoins from its nodes.conf
            await asyncio.to_thread(cluster.wait_ready, 30.0)

            async def back_on_redis() -> bool:
                d = await limiter.acquire(r)
                await limiter.release(r, d, refund=True)
                return not isinstance(d, FallbackDecision) and not limiter.in_outage

            await wait_for(back_on_redis, deadline_s=30, what="the limiter to return to the cluster")
        finally:
            await limiter.close()
            await client.aclose()

    asyncio.run(main())
    warnings, infos = outage_logs(caplog)
    print(f"[cluster] outage log lines: {len(warnings)} warnings, {len(infos)} infos")
    assert len(warnings) >= 1 and len(infos) >= 1


# -- connect -----------------------------------------------------------------------


def test_connect_pool_waits_instead_of_failing(redis_server: RedisServer) -> None:
    async def main() -> None:
        # The redis-py pool itself (the actor cache and the notifier use it;
        # the single-node limiter has its own one-connection client).
        client = connect(redis_server.url, timeout_ms=2000, max_connections=2)
        try:
            replies = await asyncio.gather(*(client.incr("pool-waits") for _ in range(100)))
            assert sorted(replies) == list(range(1, 101))
        finally:
            await client.aclose()

    asyncio.run(main())


def test_connect_timeout_bounds_a_hung_redis(redis_server_private: RedisServer) -> None:
    async def main() -> None:
        client = connect(redis_server_private.url, timeout_ms=200, max_connections=4)
        try:
            assert await client.ping()
            redis_server_private.pause()
            started = time.monotonic()
            with pytest.raises(redis.RedisError):
                await client.ping()
            assert time.monotonic() - started < 0.2 + 0.3
        finally:
            redis_server_private.resume()
            await client.aclose()

    asyncio.run(main())


def test_connect_endpoints() -> None:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    single = connect("redis://127.0.0.1:1/3", timeout_ms=100, max_connections=5)
    assert isinstance(single, Redis) and single.connection_pool.connection_kwargs["db"] == 3
    cluster = connect("redis+cluster://user:s3cret@127.0.0.1:1,127.0.0.1:2", timeout_ms=100, max_connections=5)
    assert isinstance(cluster, RedisCluster)
    assert [(n.host, n.port) for n in cluster.startup_nodes] == [("127.0.0.1", 1), ("127.0.0.1", 2)]
    with pytest.raises(ValueError) as err:
        connect("memcached://user:s3cret@host:1", timeout_ms=100, max_connections=5)
    assert "s3cret" not in str(err.value)
