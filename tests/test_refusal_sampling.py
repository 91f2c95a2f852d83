"""RateLimited events are sampled per actor, feature and cause (issue 17 item 15)."""

from __future__ import annotations

from typing import Any

import httpx

from fakes.processes import GatewayProcess, wait_until
from tests.conftest import TOKEN_A, actor, limits
from usage.refusal_sampling import RefusalSampler


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_event_per_key_and_window_counting_what_it_stands_for() -> None:
    clock = Clock()
    sampler = RefusalSampler(10.0, clock=clock)
    assert sampler.admit("a", "chat", "quota") == 1
    assert [sampler.admit("a", "chat", "quota") for _ in range(5)] == [None] * 5
    # Other keys have windows of their own.
    assert sampler.admit("a", "chat", "concurrency") == 1
    assert sampler.admit("b", "chat", "quota") == 1
    clock.now = 10.0
    # The next window's event carries the 5 suppressed refusals and itself.
    assert sampler.admit("a", "chat", "quota") == 6
    assert sampler.admit("a", "chat", "quota") is None


def test_keys_are_bounded() -> None:
    sampler = RefusalSampler(10.0, max_keys=3, clock=Clock())
    for i in range(10):
        assert sampler.admit(f"actor-{i}", "chat", "quota") == 1
    assert len(sampler._windows) == 3


def test_a_retry_loop_writes_a_handful_of_events_not_one_per_refusal(start_gateway: Any) -> None:
    gw: GatewayProcess = start_gateway(actors=[actor("actor-a", TOKEN_A, chat_completions=limits(limit=1))])
    headers = {"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"}
    body = {"model": "claude-3-haiku-20240307", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gw.base_url, headers=headers, timeout=10) as client:
        statuses = [client.post("/v1/completions/anthropic-messages", json=body).status_code for _ in range(200)]
    assert statuses[0] == 200 and statuses[1:] == [429] * 199
    gw.wait_events(1, "RateLimited")
    # Every refusal is still counted in the metrics.
    metrics = httpx.get(gw.base_url + "/metrics", timeout=10).text
    refused = [line for line in metrics.splitlines()
               if line.startswith("cody_gateway_limiter_decisions_total") and 'outcome="quota"' in line and "chat_completions" in line]  # fmt: skip
    assert refused and float(refused[0].rsplit(" ", 1)[1]) == 199
    events = wait_until(lambda: gw.events("RateLimited"), what="RateLimited events")
    assert len(events) <= 3, len(events)  # 200 requests take well under 3 windows of 10 s
    assert events[0]["metadata"]["refusals"] == 1
