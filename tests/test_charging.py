"""What is charged (SPEC point 14, issue 17 item 3): what reached the upstream, whatever the client does next."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fakes.processes import FakeProviderProcess, GatewayProcess, wait_until
from tests.conftest import TOKEN_A, actor, limits

ROUTE = "/v1/completions/anthropic-messages"
HEADERS = {"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"}
ONE_PER_HOUR = [actor("actor-a", TOKEN_A, chat_completions=limits(limit=1))]


def body(text: str, *, stream: bool = True) -> dict[str, Any]:
    return {"model": "claude-3-haiku-20240307", "max_tokens": 20, "stream": stream, "messages": [{"role": "user", "content": text}]}


def asked(fake: FakeProviderProcess, marker: str) -> int:
    return sum(1 for r in httpx.get(fake.base_url + "/_fake/requests", timeout=10).json() if marker in str(r.get("body")))


def test_a_client_that_leaves_before_the_first_byte_is_charged(start_gateway: Any, fake_provider: FakeProviderProcess) -> None:
    gw: GatewayProcess = start_gateway(actors=ONE_PER_HOUR)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.base_url + ROUTE, json=body("leave-early fake:ttft_ms=3000"), headers=HEADERS, timeout=0.5)
    wait_until(lambda: gw.events("CompletionsFinished"), what="the disconnected request's event")
    assert gw.events("CompletionsFinished")[0]["metadata"]["outcome"] == "client_disconnected"
    # Before: refunded, so a 1/h actor could make 40 upstream calls. Now the hour's one request is spent.
    again = httpx.post(gw.base_url + ROUTE, json=body("leave-early-again", stream=False), headers=HEADERS, timeout=10)
    assert again.status_code == 429, again.text
    assert asked(fake_provider, "leave-early-again") == 0


def test_what_never_left_or_the_upstream_refused_is_refunded(start_gateway: Any) -> None:
    gw: GatewayProcess = start_gateway(actors=ONE_PER_HOUR, env={"CODY_GATEWAY_UPSTREAM_RETRY_MAX_ATTEMPTS": "1"})
    refused = httpx.post(gw.base_url + ROUTE, json=body("refused fake:status=400", stream=False), headers=HEADERS, timeout=10)
    assert refused.status_code == 400
    failing = httpx.post(gw.base_url + ROUTE, json=body("failing fake:status=500", stream=False), headers=HEADERS, timeout=10)
    assert failing.status_code == 500
    # Both refunded: the hour's one request is still there.
    assert httpx.post(gw.base_url + ROUTE, json=body("ok", stream=False), headers=HEADERS, timeout=10).status_code == 200
