"""Limiter throughput: decisions per second and Redis round trips per request.

    python -m bench.limiter_bench [--requests 20000] [--concurrency 50] [--redis URL] [--uvloop]

Without --redis it starts a throwaway redis-server on an ephemeral port.
Each request is one acquire (with a concurrency lease) and one release, the
gateway's hot path. Round trips are counted from the server's INFO
commandstats (top-level commands only: commands run inside a script are
listed there too, and are not round trips). CPU per request is this
process's CPU time (time.process_time), so the redis-server's own work is not
in it: on a shared machine it is steadier than req/s. Prints figures; never fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from redis.asyncio.cluster import RedisCluster

from limiter.base import Limiter, LimitRule
from limiter.memory import MemoryLimiter
from limiter.redis_limiter import RedisLimiter
from redisconn.connect import connect

# Commands a client sends itself; everything a script calls is excluded.
_TOP_LEVEL = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro", "cmdstat_eval_ro", "cmdstat_script|load")


def _rule(concurrency: int) -> LimitRule:
    return LimitRule(
        bucket="bench-" + uuid.uuid4().hex[:8],
        feature="chat_completions",
        limit=10**9,
        interval_s=3600.0,
        concurrency=concurrency,
    )


async def _one(limiter: Limiter, rule: LimitRule) -> bool:
    decision = await limiter.acquire(rule)
    await limiter.release(rule, decision, refund=False)
    return decision.allowed


async def _sequential(limiter: Limiter, requests: int) -> tuple[float, float]:
    """(requests per second, this process's CPU microseconds per request)."""
    rule = _rule(concurrency=10)
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(requests):
        await _one(limiter, rule)
    return requests / (time.perf_counter() - started), (time.process_time() - cpu) / requests * 1e6


async def _concurrent(limiter: Limiter, requests: int, concurrency: int) -> tuple[float, float]:
    rule = _rule(concurrency=concurrency * 2)
    per_worker = requests // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await _one(limiter, rule)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    done = per_worker * concurrency
    return done / (time.perf_counter() - started), (time.process_time() - cpu) / done * 1e6


async def _round_trips(client: Any) -> int:
    if isinstance(client, RedisCluster):
        per_node = await client.info("commandstats", target_nodes=RedisCluster.ALL_NODES)
        every = list(per_node.values())
    else:
        every = [await client.info("commandstats")]
    return sum(int(stats.get(name, {}).get("calls", 0)) for stats in every for name in _TOP_LEVEL)


async def _bench(url: str, requests: int, concurrency: int) -> None:
    memory = MemoryLimiter()
    seq, seq_cpu = await _sequential(memory, requests)
    conc, conc_cpu = await _concurrent(memory, requests, concurrency)
    print(
        f"memory   sequential {seq:>10,.0f} req/s {seq_cpu:6.1f} us CPU/req   "
        f"{concurrency} concurrent {conc:>10,.0f} req/s {conc_cpu:6.1f} us CPU/req   (1 req = acquire + release)"
    )

    client = connect(url, timeout_ms=1000, max_connections=64)
    # On one node the limiter talks through its own RESP2 client; redis-py's
    # client here only reads the server's command counts.
    redis_limiter = RedisLimiter(client)
    try:
        await redis_limiter.load_scripts()
        before = await _round_trips(client)
        seq, seq_cpu = await _sequential(redis_limiter, requests)
        mid = await _round_trips(client)
        conc, conc_cpu = await _concurrent(redis_limiter, requests, concurrency)
        after = await _round_trips(client)
        print(
            f"redis    sequential {seq:>10,.0f} req/s {seq_cpu:6.1f} us CPU/req   "
            f"{concurrency} concurrent {conc:>10,.0f} req/s {conc_cpu:6.1f} us CPU/req"
        )
        print(
            f"redis    round trips per acquire+release: sequential {(mid - before) / requests:.2f}, "
            f"concurrent {(after - mid) / (requests // concurrency * concurrency):.2f} "
            f"(NOSCRIPT replies {redis_limiter.stats.noscript_replies})"
        )
    finally:
        await redis_limiter.close()
        await client.aclose()


@contextlib.contextmanager
def _redis_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    from tests.support.redis_servers import RedisServer

    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--redis", help="redis://, rediss:// or redis+cluster:// endpoint (default: a throwaway server)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as the gateway does")
    args = parser.parse_args(argv)
    with _redis_url(args.redis) as url:
        print(f"python {sys.version.split()[0]}, {'uvloop' if args.uvloop else 'asyncio'} loop, {args.requests:,} requests")
        coro = _bench(url, args.requests, args.concurrency)
        if args.uvloop:
            import uvloop

            uvloop.run(coro)
        else:
            asyncio.run(coro)


if __name__ == "__main__":
    main()
