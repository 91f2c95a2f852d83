"""The Redis limiter through real gateway processes: exact across processes, leases, outages, cluster.

Figures are printed (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from typing import Any

import httpx
import pytest

from fakes.processes import GatewayProcess, wait_until
from tests.conftest import TOKEN_A, actor, limits
from tests.support.redis_servers import RedisClusterServers, RedisServer
from tests.test_anthropic_messages import ROUTE, message_body

pytestmark = pytest.mark.timeout(150)


def headers(token: str = TOKEN_A) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "X-Sourcegraph-Feature": "chat_completions",
        "Content-Type": "application/json",
    }


async def burst(urls: list[str], count: int, body: dict[str, Any], timeout_ms: int = 30000) -> list[httpx.Response]:
    """``count`` concurrent requests spread over the gateways."""
    limits_ = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits_) as client:
        payload = json.dumps(body)
        extra = {"X-Timeout-Ms": str(timeout_ms)}
        return await asyncio.gather(
            *(client.post(urls[i % len(urls)] + ROUTE, content=payload, headers={**headers(), **extra}) for i in range(count))
        )


def in_flight(gw: GatewayProcess) -> int:
    return httpx.get(gw.base_url + "/v1/limits", headers=headers(), timeout=10).json()["chat_completions"]["inFlight"]


def fake_stats(fake: Any) -> dict[str, int]:
    return httpx.get(fake.base_url + "/_fake/stats", timeout=10).json()


def test_two_processes_share_exact_limits(start_gateway: Any, redis_server: RedisServer) -> None:
    env = {"REDIS_ENDPOINT": redis_server.url, "CODY_GATEWAY_REDIS_TIMEOUT_MS": "2000"}
    actors = [actor("exact", TOKEN_A, chat_completions=limits(50, "1h", concurrentRequests=1000))]
    first = start_gateway(actors, env=env, name="gateway-1")
    second = start_gateway(actors, env=env, name="gateway-2")
    responses = asyncio.run(burst([first.base_url, second.base_url], 300, message_body("fake:tokens=2")))
    statuses = Counter(r.status_code for r in responses)
    print(f"\n300 concurrent requests over 2 gateway processes, limit 50/h: {dict(statuses)}")
    assert statuses == {200: 50, 429: 250}
    for response in responses:
        if response.status_code == 429:
            assert response.headers["X-RateLimit-Limit"] == "50"
            assert response.headers["X-RateLimit-Remaining"] == "0"
            assert int(response.headers["Retry-After"]) >= 1
            assert int(response.headers["X-RateLimit-Reset"]) >= 1
            assert "you have exceeded the rate limit of 50 requests" in response.json()["error"]


def test_concurrency_limit_holds_and_every_slot_comes_back(
    start_gateway: Any, redis_server: RedisServer, fake_provider: Any
) -> None:
    env = {"REDIS_ENDPOINT": redis_server.url, "CODY_GATEWAY_REDIS_TIMEOUT_MS": "2000", "CODY_GATEWAY_UPSTREAM_STALL_TIMEOUT_S": "1"}
    gw = start_gateway([actor("five", TOKEN_A, chat_completions=limits(10_000, "1h", concurrentRequests=5))], env=env)
    httpx.post(fake_provider.base_url + "/_fake/reset", timeout=10)
    wait_until(lambda: fake_stats(fake_provider)["in_flight"] == 0, 10, what="fake idle")
    httpx.post(fake_provider.base_url + "/_fake/reset", timeout=10)

    responses = asyncio.run(burst([gw.base_url], 40, message_body("fake:ttft_ms=300 fake:tokens=5 fake:tokens_per_s=20", stream=True)))
    statuses = Counter(r.status_code for r in responses)
    stats = fake_stats(fake_provider)
    print(f"\n40 concurrent streams, concurrency 5: {dict(statuses)}; upstream max in flight {stats['max_in_flight']}")
    assert stats["max_in_flight"] <= 5
    assert statuses[200] >= 5 and statuses[200] + statuses[429] == 40
    assert all("concurrency limit of 5" in r.json()["error"] for r in responses if r.status_code == 429)
    assert in_flight(gw) == 0

    # Every way a request can end gives its slot back.
    assert httpx.post(gw.base_url + ROUTE, content=json.dumps(message_body("fake:status=500")), headers=headers(), timeout=30).status_code == 500
    timeout = httpx.post(gw.base_url + ROUTE, content=json.dumps(message_body("fake:ttft_ms=5000", stream=True)),
                         headers={**headers(), "X-Timeout-Ms": "300"}, timeout=30)
    assert timeout.status_code == 504
    stalled = httpx.post(gw.base_url + ROUTE, content=json.dumps(message_body("fake:tokens=10 fake:stall_after=2", stream=True)),
                         headers=headers(), timeout=30)
    assert stalled.status_code == 200 and "event: error" in stalled.text
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    payload = json.dumps(message_body("fake:tokens=100 fake:tokens_per_s=10", stream=True)).encode()
    sock.sendall(
        (f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\nX-Sourcegraph-Feature: chat_completions\r\n"
         f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    )
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    assert in_flight(gw) == 1
    sock.close()
    wait_until(lambda: in_flight(gw) == 0, 10, what="slot of the disconnected client released")
    events = gw.wait_events(statuses[200] + 4, "CompletionsFinished")
    outcomes = Counter(e["metadata"]["outcome"] for e in events)
    print(f"outcomes: {dict(outcomes)}")
    assert outcomes["client_disconnected"] == 1 and outcomes["upstream_error"] == 1


def test_slots_of_a_killed_process_come_back_after_the_lease(start_gateway: Any, redis_server: RedisServer) -> None:
    env = {
        "REDIS_ENDPOINT": redis_server.url,
        "CODY_GATEWAY_REDIS_TIMEOUT_MS": "2000",
        "CODY_GATEWAY_UPSTREAM_LEASE_GRACE_S": "1",
    }
    actors = [actor("leased", TOKEN_A, chat_completions=limits(10_000, "1h", concurrentRequests=1))]
    doomed = start_gateway(actors, env=env, name="doomed")
    survivor = start_gateway(actors, env=env, name="survivor")
    sock = socket.create_connection(("127.0.0.1", doomed.port), timeout=10)
    payload = json.dumps(message_body("fake:tokens=100 fake:tokens_per_s=5", stream=True)).encode()
    sock.sendall(
        (f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\nX-Sourcegraph-Feature: chat_completions\r\n"
         f"X-Timeout-Ms: 2000\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload
    )
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    doomed.kill()
    sock.close()
    refused = httpx.post(survivor.base_url + ROUTE, content=json.dumps(message_body()), headers=headers(), timeout=30)
    assert refused.status_code == 429  # the dead process's lease still counts...
    # ...until it expires: request deadline (2 s) + grace (1 s).
    wait_until(lambda: in_flight(survivor) == 0, 15, what="lease expiry")
    ok = httpx.post(survivor.base_url + ROUTE, content=json.dumps(message_body()), headers=headers(), timeout=30)
    assert ok.status_code == 200


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_redis_outage_under_load(start_gateway: Any, redis_server_private: RedisServer, policy: str) -> None:
    env = {
        "REDIS_ENDPOINT": redis_server_private.url,
        "CODY_GATEWAY_REDIS_TIMEOUT_MS": "200",
        "CODY_GATEWAY_REDIS_FAILURE_POLICY": policy,
    }
    gw = start_gateway([actor("outage", TOKEN_A, chat_completions=limits(20, "1h"))], env=env)
    before = asyncio.run(burst([gw.base_url], 30, message_body()))
    assert Counter(r.status_code for r in before) == {200: 20, 429: 10}

    redis_server_private.stop()
    during = asyncio.run(burst([gw.base_url], 30, message_body()))
    statuses = Counter(r.status_code for r in during)
    elapsed = max(r.elapsed.total_seconds() for r in during)
    print(f"\n{policy}: Redis down, 30 requests: {dict(statuses)}, slowest {elapsed:.3f}s")
    assert 500 not in statuses
    if policy == "fail_open":
        assert statuses[200] == 20 and statuses[429] == 10  # the in-process twin enforces the same rule
    else:
        assert statuses == {503: 30}
        assert all(r.json()["error"] == "rate limiter unavailable, please retry" for r in during)
    health = httpx.get(gw.base_url + "/-/healthz", headers={"Authorization": "Bearer diag-secret-for-tests"}, timeout=10).json()
    assert health["redis"]["up"] is False

    redis_server_private.start()
    # Back on Redis: the bucket there is still empty, so the limit holds again.
    def back_on_redis() -> bool:
        return httpx.post(gw.base_url + ROUTE, content=json.dumps(message_body()), headers=headers(), timeout=30).status_code == 429
    wait_until(back_on_redis, 15, interval=0.2, what="limits enforced from Redis again")
    assert "Redis limiter unavailable" in gw.process.output()


def test_exact_limits_on_a_redis_cluster(start_gateway: Any, redis_cluster: RedisClusterServers) -> None:
    env = {"REDIS_ENDPOINT": redis_cluster.url, "CODY_GATEWAY_REDIS_TIMEOUT_MS": "2000"}
    actors = [actor("clustered", TOKEN_A, chat_completions=limits(50, "1h", concurrentRequests=1000))]
    first = start_gateway(actors, env=env, name="gateway-1")
    second = start_gateway(actors, env=env, name="gateway-2")
    responses = asyncio.run(burst([first.base_url, second.base_url], 200, message_body("fake:tokens=2")))
    statuses = Counter(r.status_code for r in responses)
    print(f"\n200 concurrent requests over 2 gateways on a 3-node cluster, limit 50/h: {dict(statuses)}")
    assert statuses == {200: 50, 429: 150}
    limits_view = httpx.get(first.base_url + "/v1/limits", headers=headers(), timeout=10).json()["chat_completions"]
    assert limits_view["remaining"] == 0 and limits_view["inFlight"] == 0
