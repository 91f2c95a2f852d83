"""Hostile or careless clients (issue 17 items 12, 13, 16, 17, 22), through the real server."""

from __future__ import annotations

import json
from typing import Any

import httpx

from fakes.processes import FakeProviderProcess, GatewayProcess, wait_until
from tests.conftest import DIAGNOSTICS_SECRET, TOKEN_A
from tests.test_probes import MODEL

ROUTE = "/v1/completions/anthropic-messages"
HEADERS = {"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"}


def body(text: str = "hi", *, stream: bool = False) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 20, "stream": stream, "messages": [{"role": "user", "content": text}]}


def from_address(address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (another loopback address)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


def access_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.process.output().splitlines() if '"gateway.access"' in line]


def test_client_identifiers_are_bounded_in_events_and_upstream_metadata(start_gateway: Any, fake_provider: FakeProviderProcess) -> None:
    gw: GatewayProcess = start_gateway()
    huge = "u" * 20_000  # three of them: 60 KB of headers, under the 64 KB cap
    headers = {**HEADERS, "X-Sourcegraph-Actor-UID": huge, "X-Sourcegraph-Actor-Anonymous-UID": huge,
               "X-Sourcegraph-Interaction-ID": "i" * 20_000}  # fmt: skip
    response = httpx.post(gw.base_url + ROUTE, json=body("bounded-ids"), headers=headers, timeout=10)
    assert response.status_code == 200
    event = gw.wait_events(1, "CompletionsFinished")[0]
    row = json.dumps(event)
    assert len(row) < 4096, len(row)  # was a 241 KB row
    assert event["metadata"]["sg_actor_anonymous_uid"] == "u" * 256
    assert event["metadata"]["interaction_id"] == "i" * 256
    sent = [r for r in httpx.get(fake_provider.base_url + "/_fake/requests", timeout=10).json() if "bounded-ids" in json.dumps(r["body"])]
    user_id = sent[-1]["body"]["metadata"]["user_id"]
    assert len(user_id) <= 512 and user_id.endswith("u" * 256)


def test_diagnostics_secret_guesses_are_throttled_per_address(start_gateway: Any) -> None:
    gw: GatewayProcess = start_gateway()
    with httpx.Client(base_url=gw.base_url, timeout=10) as client:
        codes = [client.get("/-/healthz", headers={"Authorization": f"Bearer guess-{i}"}).status_code for i in range(40)]
        # Before: 40 x 401 (4,000 guesses/s went unthrottled). Now a burst, then 429 with Retry-After.
        assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}, codes
        refused = client.get("/-/healthz", headers={"Authorization": f"Bearer {DIAGNOSTICS_SECRET}"})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    # Another client address is not affected.
    with from_address("127.0.0.2") as other:
        answer = other.get(f"{gw.base_url}/-/healthz", headers={"Authorization": f"Bearer {DIAGNOSTICS_SECRET}"})
        assert answer.status_code in (200, 503), answer.text


def test_the_resolved_model_header_is_on_every_answer_once_resolved(start_gateway: Any) -> None:
    gw: GatewayProcess = start_gateway(env={"CODY_GATEWAY_UPSTREAM_RETRY_MAX_ATTEMPTS": "1", "CODY_GATEWAY_UPSTREAM_CIRCUIT_MIN_SAMPLES": "2",
                                            "CODY_GATEWAY_UPSTREAM_CIRCUIT_FAILURE_RATIO": "0.5"})  # fmt: skip
    timeout = httpx.post(gw.base_url + ROUTE, json=body("slow fake:ttft_ms=3000"), headers={**HEADERS, "X-Timeout-Ms": "200"}, timeout=10)
    assert timeout.status_code == 504
    assert timeout.headers["X-Cody-Resolved-Model"] == f"anthropic/{MODEL}"
    for _ in range(2):
        assert httpx.post(gw.base_url + ROUTE, json=body("down fake:status=500"), headers=HEADERS, timeout=10).status_code == 500
    open_circuit = httpx.post(gw.base_url + ROUTE, json=body(), headers=HEADERS, timeout=10)
    assert open_circuit.status_code == 503, open_circuit.text
    assert open_circuit.headers["X-Cody-Resolved-Model"] == f"anthropic/{MODEL}"


def test_405_says_which_methods_are_allowed(start_gateway: Any) -> None:
    gw: GatewayProcess = start_gateway()
    response = httpx.get(gw.base_url + ROUTE, headers=HEADERS, timeout=10)
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    limits = httpx.post(gw.base_url + "/v1/limits", headers=HEADERS, timeout=10)
    assert limits.status_code == 405 and limits.headers["Allow"] == "GET"


def test_forwarded_addresses_only_from_trusted_proxies(start_gateway: Any) -> None:
    gw: GatewayProcess = start_gateway(env={"CODY_GATEWAY_SERVER_TRUSTED_PROXIES": "127.0.0.2/32"})
    forwarded = {"X-Forwarded-For": "203.0.113.7, 127.0.0.2", "Cf-Connecting-Ip": "", "X-Sourcegraph-Interaction-ID": "chat-42"}
    # From an address that is not a trusted proxy: ignored.
    httpx.get(f"{gw.base_url}/-/__version", headers=forwarded, timeout=10)
    # From the trusted proxy: the right-most untrusted hop is the client.
    with from_address("127.0.0.2") as proxy:
        proxy.get(f"{gw.base_url}/-/__version", headers=forwarded)
        proxy.get(f"{gw.base_url}/-/__version", headers={"Cf-Connecting-Ip": "198.51.100.9"})
    lines = wait_until(lambda: (lambda found: found if len(found) >= 3 else None)(
        [line for line in access_lines(gw) if line["path"] == "/-/__version"]), what="three access lines")  # fmt: skip
    assert [line["remote_ip"] for line in lines] == ["127.0.0.1", "203.0.113.7", "198.51.100.9"]
    assert lines[0]["interaction_id"] == "chat-42"
