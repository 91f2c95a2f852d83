"""Concurrency leases through the real gateway and a real Redis (issue 17 items 2 and 4(b)).

A lease lives ``upstream.lease_ttl_s`` at most and is renewed while its request
runs; a stream cut by the drain timeout gives its lease back before the process ends.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import httpx
import pytest

from fakes.processes import GatewayProcess, wait_until
from tests.conftest import TOKEN_A, actor, limits

ROUTE = "/v1/completions/anthropic-messages"
HEADERS = {"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"}
ONE_AT_A_TIME = [actor("actor-a", TOKEN_A, chat_completions=limits(concurrentRequests=1))]


def body(text: str, *, stream: bool = True) -> dict[str, Any]:
    return {"model": "claude-3-haiku-20240307", "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": text}]}


def open_stream(gw: GatewayProcess, text: str) -> tuple[threading.Thread, list[bytes]]:
    chunks: list[bytes] = []

    def read() -> None:
        try:
            with httpx.stream("POST", gw.base_url + ROUTE, json=body(text), headers=HEADERS, timeout=60) as response:
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
        except httpx.HTTPError:
            pass  # the gateway ends it on shutdown

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: chunks, 15, what="the stream's first bytes")
    return reader, chunks


@pytest.mark.timeout(60)
def test_a_long_request_keeps_its_lease_past_the_lease_lifetime(start_gateway: Any, redis_server: Any) -> None:
    gw = start_gateway(actors=ONE_AT_A_TIME, env={"REDIS_ENDPOINT": redis_server.url, "CODY_GATEWAY_UPSTREAM_LEASE_TTL_S": "1"})
    reader, chunks = open_stream(gw, "long fake:tokens=50 fake:tokens_per_s=10")
    # Three lease lifetimes later the stream still holds its slot: renewed, never expired.
    wait_until(lambda: len(chunks) >= 30, 20, what="3 s of streaming")
    second = httpx.post(gw.base_url + ROUTE, json=body("second", stream=False), headers=HEADERS, timeout=30)
    assert second.status_code == 429, second.text
    assert "concurrency limit" in second.json()["error"]
    reader.join(30)
    # Released when it ended: the next one is admitted at once.
    assert httpx.post(gw.base_url + ROUTE, json=body("third", stream=False), headers=HEADERS, timeout=30).status_code == 200


@pytest.mark.timeout(60)
def test_a_stream_cut_by_the_drain_timeout_gives_its_lease_back(start_gateway: Any, redis_server: Any) -> None:
    env = {"REDIS_ENDPOINT": redis_server.url, "CODY_GATEWAY_SERVER_DRAIN_TIMEOUT_S": "1"}
    first = start_gateway(actors=ONE_AT_A_TIME, env=env, name="first")
    open_stream(first, "endless fake:tokens=400 fake:tokens_per_s=10")
    first.process.signal(signal.SIGTERM)
    first.process.wait_for("drain timeout", timeout=15)
    assert first.process.proc.wait(20) == 0
    # Another process on the same Redis: the cut stream's slot is free, not held for the lease's life.
    second = start_gateway(actors=ONE_AT_A_TIME, env=env, name="second")
    response = httpx.post(second.base_url + ROUTE, json=body("after", stream=False), headers=HEADERS, timeout=30)
    assert response.status_code == 200, response.text
