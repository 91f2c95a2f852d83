"""Upstream failures, for every provider, through the real gateway.

Each failure mode gives its documented status (before the first byte) or a
provider-shaped in-band error (after it), releases the concurrency slot, and
produces exactly one CompletionsFinished event with the right
``upstream_status_code`` and ``resolved_status_code``.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from fakes.processes import wait_until
from tests.conftest import TOKEN_A, actor, limits
from tests.providers_support import (  # noqa: F401  (fixtures)
    WiredGateway,
    assert_json_error,
    gw,
    marker,
    post,
    received,
    sse_data,
    start_module_wired,
    start_wired,
)

pytestmark = pytest.mark.timeout(120)

Body = Callable[[str, bool], dict[str, Any]]
PROVIDERS: dict[str, tuple[str, str, Body, int]] = {
    # name: (route, feature, body(text, stream), default Retry-After on 503)
    "openai": (
        "/v1/completions/openai", "chat_completions",
        lambda text, stream: {"model": "gpt-4", "stream": stream, "messages": [{"role": "user", "content": text}]}, 30,
    ),
    "fireworks": (
        "/v1/completions/fireworks", "code_completions",
        lambda text, stream: {"model": "starcoder", "stream": stream, "prompt": text}, 30,
    ),
    "google": (
        "/v1/completions/google", "chat_completions",
        lambda text, stream: {"model": "gemini-pro", "stream": stream, "contents": [{"parts": [{"text": text}]}]}, 3,
    ),
    "anthropic": (
        "/v1/completions/anthropic", "code_completions",
        lambda text, stream: {"model": "claude-2", "stream": stream, "max_tokens_to_sample": 300,
                              "prompt": f"\n\nHuman: {text}\n\nAssistant:"}, 2,
    ),
}  # fmt: skip
NAMES = list(PROVIDERS)
ONE_AT_A_TIME = limits(10_000, "1h", concurrentRequests=1)


@pytest.fixture(scope="module")
def shared(start_module_wired: Any) -> WiredGateway:
    return start_module_wired(
        [actor("serial", TOKEN_A, chat_completions=ONE_AT_A_TIME, code_completions=ONE_AT_A_TIME)],
        env={
            "CODY_GATEWAY_UPSTREAM_STALL_TIMEOUT_S": "1",
            # The breaker has its own tests; here it must not turn failures into 503s.
            "CODY_GATEWAY_UPSTREAM_CIRCUIT_MIN_SAMPLES": "100000",
        },
    )


def call(gw: WiredGateway, name: str, text: str, *, stream: bool, timeout_ms: int | None = None) -> httpx.Response:
    route, feature, body, _ = PROVIDERS[name]
    headers = {"X-Timeout-Ms": str(timeout_ms)} if timeout_ms else {}
    return post(gw, route, body(text, stream), feature=feature, headers=headers)


def finished(gw: WiredGateway, name: str, trace: str) -> dict[str, Any]:
    """The request's one event, after proving its slot came back (the actor may run one at a time)."""
    event = gw.event_for(trace)
    ok = call(gw, name, "after " + marker(), stream=False)
    assert ok.status_code == 200, f"slot not released: {ok.status_code} {ok.text}"
    gw.event_for(ok.headers["X-Trace"])
    assert len(gw.events_for(trace, "CompletionsFinished")) == 1
    return event["metadata"]


def codes(meta: dict[str, Any]) -> tuple[Any, Any]:
    return meta["upstream_status_code"], meta["resolved_status_code"]


def assert_in_band_error(name: str, response: httpx.Response) -> None:
    """The stream ends with the provider's own error shape, never with a clean end."""
    assert response.status_code == 200
    data = sse_data(response.text)
    assert data and data[-1] != "[DONE]", data[-3:]
    last = json.loads(data[-1])
    if name == "anthropic":
        assert last["type"] == "error" and last["error"]["message"]
    else:
        assert last["error"]["message"]


@pytest.mark.parametrize("name", NAMES)
def test_429_becomes_503_with_the_provider_retry_after(gw: WiredGateway, fake_provider: Any, name: str) -> None:
    mark = marker()
    response = call(gw, name, f"{mark} fake:status=429", stream=True)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == str(PROVIDERS[name][3])
    assert "error" in response.json()  # the provider's own error body is relayed
    assert len(received(fake_provider.base_url, mark, count=3)) == 3  # retried before the first byte
    meta = finished(gw, name, response.headers["X-Trace"])
    assert codes(meta) == (429, 503) and meta["outcome"] == "error"


@pytest.mark.parametrize("name", NAMES)
def test_long_upstream_retry_after_is_relayed_not_waited(gw: WiredGateway, fake_provider: Any, name: str) -> None:
    mark = marker()
    response = call(gw, name, f"{mark} fake:status=429 fake:retry_after=60", stream=False)
    assert response.status_code == 503 and response.headers["Retry-After"] == "60"
    assert len([r for r in received(fake_provider.base_url, mark)]) == 1
    assert codes(finished(gw, name, response.headers["X-Trace"])) == (429, 503)


@pytest.mark.parametrize("name", NAMES)
def test_500_is_retried_then_relayed(gw: WiredGateway, fake_provider: Any, name: str) -> None:
    mark = marker()
    response = call(gw, name, f"{mark} fake:status=500", stream=False)
    assert response.status_code == 500 and "error" in response.json()
    assert len(received(fake_provider.base_url, mark, count=3)) == 3
    assert codes(finished(gw, name, response.headers["X-Trace"])) == (500, 500)


@pytest.mark.parametrize("name", NAMES)
def test_a_transient_500_is_retried_into_a_success(gw: WiredGateway, fake_provider: Any, name: str) -> None:
    mark = marker()
    response = call(gw, name, f"{mark} fake:fail_times=1 fake:fail_key={mark} fake:tokens=3", stream=True)
    assert response.status_code == 200 and sse_data(response.text)
    assert len(received(fake_provider.base_url, mark, count=2)) == 2
    meta = finished(gw, name, response.headers["X-Trace"])
    assert codes(meta) == (200, 200) and meta["outcome"] == "complete" and meta["completion_token_count"] == 3


@pytest.mark.parametrize("name", NAMES)
def test_503_keeps_status_and_gets_retry_after(gw: WiredGateway, name: str) -> None:
    response = call(gw, name, f"{marker()} fake:status=503", stream=True)
    assert response.status_code == 503 and response.headers["Retry-After"] == str(PROVIDERS[name][3])
    assert codes(finished(gw, name, response.headers["X-Trace"])) == (503, 503)


# curl's low-speed check averages over a few seconds, so a stall takes several
# seconds to detect even with a 1 s limit: one provider each (the in-band
# shapes of every provider are covered by the reset and timeout cases).
def test_stall_after_first_byte_ends_the_stream_in_band(gw: WiredGateway) -> None:
    response = call(gw, "openai", f"{marker()} fake:tokens=10 fake:stall_after=2", stream=True)
    assert_in_band_error("openai", response)
    assert "stalled" in response.text
    meta = finished(gw, "openai", response.headers["X-Trace"])
    assert codes(meta) == (200, 200) and meta["outcome"] == "upstream_error"
    assert meta["completion_character_count"] > 0 and meta["completion_token_count"] is not None


def test_stall_before_first_byte_is_504(gw: WiredGateway) -> None:
    # Headers arrive, then nothing: the stall limit applies (before the headers,
    # a slow first token is only bounded by the request timeout).
    response = call(gw, "google", f"{marker()} fake:stall_after=0", stream=False)
    assert_json_error(response, 504, "upstream provider google stalled: no data for 1s")
    meta = finished(gw, "google", response.headers["X-Trace"])
    assert codes(meta) == (200, 504) and meta["outcome"] == "error"


@pytest.mark.parametrize("name", NAMES)
def test_reset_mid_stream_ends_the_stream_in_band(gw: WiredGateway, name: str) -> None:
    response = call(gw, name, f"{marker()} fake:tokens=10 fake:disconnect_after=3", stream=True)
    assert_in_band_error(name, response)
    assert "closed the connection" in response.text
    meta = finished(gw, name, response.headers["X-Trace"])
    assert codes(meta) == (200, 200) and meta["outcome"] == "upstream_error"


@pytest.mark.parametrize("name", NAMES)
def test_provider_error_event_in_a_200_stream_is_relayed_and_marked(gw: WiredGateway, name: str) -> None:
    response = call(gw, name, f"{marker()} fake:tokens=10 fake:error_after=2", stream=True)
    assert_in_band_error(name, response)
    meta = finished(gw, name, response.headers["X-Trace"])
    assert codes(meta) == (200, 200) and meta["outcome"] == "upstream_error"


@pytest.mark.parametrize("name", NAMES)
def test_timeout_before_first_byte_is_504(gw: WiredGateway, name: str) -> None:
    response = call(gw, name, f"{marker()} fake:ttft_ms=900", stream=True, timeout_ms=300)
    assert_json_error(response, 504, f"request to upstream provider {name} timed out")
    meta = finished(gw, name, response.headers["X-Trace"])
    assert codes(meta) == (None, 504) and meta["outcome"] == "error"


@pytest.mark.parametrize("name", NAMES)
def test_timeout_after_first_byte_ends_the_stream_in_band(gw: WiredGateway, name: str) -> None:
    response = call(gw, name, f"{marker()} fake:tokens=40 fake:tokens_per_s=20", stream=True, timeout_ms=600)
    assert_in_band_error(name, response)
    assert "timed out" in response.text
    meta = finished(gw, name, response.headers["X-Trace"])
    assert codes(meta) == (200, 200) and meta["outcome"] == "upstream_error"


def open_stream(gw: WiredGateway, name: str, text: str) -> tuple[socket.socket, str]:
    route, feature, body, _ = PROVIDERS[name]
    payload = json.dumps(body(text, True)).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    sock.sendall(
        f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN_A}\r\n"
        f"X-Sourcegraph-Feature: {feature}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    received_bytes = b""
    while b"\r\n\r\n" not in received_bytes or len(received_bytes.split(b"\r\n\r\n", 1)[1]) < 64:
        chunk = sock.recv(65536)
        assert chunk, received_bytes
        received_bytes += chunk
    head = received_bytes.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    match = re.search(r"(?im)^X-Trace: (\S+)", head)
    assert match
    return sock, match.group(1)


@pytest.mark.parametrize("name", NAMES)
def test_client_disconnect_cancels_upstream_and_releases_the_slot(gw: WiredGateway, fake_provider: Any, name: str) -> None:
    sock, trace = open_stream(gw, name, f"{marker()} fake:tokens=400 fake:tokens_per_s=40")
    busy = call(gw, name, "while busy", stream=False)
    assert_json_error(busy, 429, "concurrency limit of 1")
    sock.close()
    wait_until(lambda: httpx.get(fake_provider.base_url + "/_fake/stats", timeout=10).json()["in_flight"] == 0, 10, what="upstream cancelled")
    meta = finished(gw, name, trace)
    assert meta["outcome"] == "client_disconnected" and meta["upstream_status_code"] == 200
    assert meta["completion_character_count"] > 0 and meta["completion_token_count"] is not None


def test_connect_error_is_502_and_retried(start_wired: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    gw = start_wired(env={"CODY_GATEWAY_GOOGLE_API_URL": dead})
    response = call(gw, "google", "hello", stream=True)
    assert_json_error(response, 502, "failed to connect to upstream provider google")
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert codes(meta) == (None, 502)
    assert "retrying google after connect_error (attempt 2)" in gw.process.output()
