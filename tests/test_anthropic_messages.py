"""The walking skeleton end to end: Anthropic Messages through the real gateway process."""

from __future__ import annotations

import json
import socket
from typing import Any

import anthropic
import httpx
import pytest

from fakes.processes import GatewayProcess, wait_until
from tests.conftest import ANTHROPIC_KEY, DIAGNOSTICS_SECRET, TOKEN_A, actor, limits
from tests.support.error_shapes import error_message

MODEL = "claude-3-haiku-20240307"
ROUTE = "/v1/completions/anthropic-messages"


def post(gw: GatewayProcess, body: Any, *, token: str | None = TOKEN_A, feature: str | None = "chat_completions",
         headers: dict[str, str] | None = None, path: str = ROUTE, raw: bytes | None = None) -> httpx.Response:
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if feature is not None:
        hdrs["X-Sourcegraph-Feature"] = feature
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(gw.base_url + path, content=content, headers=hdrs, timeout=30)


def message_body(text: str = "hello", *, stream: bool = False, max_tokens: int = 100, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": max_tokens, "stream": stream, "messages": [{"role": "user", "content": text}], **extra}


def fake_requests(fake_base: str) -> list[dict[str, Any]]:
    return httpx.get(fake_base + "/_fake/requests", timeout=10).json()


def last_fake_request(fake_base: str, path: str = "/v1/messages") -> dict[str, Any]:
    return [r for r in fake_requests(fake_base) if r["path"] == path][-1]


def assert_json_error(response: httpx.Response, status: int, contains: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert contains in error_message(body, response.request.url.path), body
    assert response.headers.get("X-Trace") and response.headers.get("X-Trace-Span")
    return body


@pytest.fixture
def gw(start_gateway: Any) -> GatewayProcess:
    return start_gateway()


def sdk(gw: GatewayProcess, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=gw.base_url + "/anthropic",
        api_key=TOKEN_A,
        max_retries=0,
        default_headers={"X-Sourcegraph-Feature": "chat_completions"},
        **kwargs,
    )


def test_sdk_streamed_message_matches_upstream(gw: GatewayProcess, fake_provider: Any) -> None:
    prompt = "stream please fake:tokens=12"
    direct = anthropic.Anthropic(base_url=fake_provider.base_url, api_key="x", max_retries=0)
    with direct.messages.stream(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": prompt}]) as s:
        expected_text = "".join(s.text_stream)
        expected_usage = s.get_final_message().usage

    with sdk(gw).messages.stream(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": prompt}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected_text and text
    assert final.usage.input_tokens == expected_usage.input_tokens
    assert final.usage.output_tokens == expected_usage.output_tokens == 12

    event = gw.wait_events(1, "CompletionsFinished")[0]
    meta = event["metadata"]
    assert event["identifier"] == "actor-a" and event["source"] == "static"
    assert meta["completion_token_count"] == 12
    assert meta["prompt_token_count"] == expected_usage.input_tokens
    assert meta["completion_character_count"] == len(expected_text)
    assert meta["stream"] is True and meta["outcome"] == "complete"
    assert meta["model"] == f"anthropic/{MODEL}" and meta["resolved_status_code"] == 200
    assert meta["trace_id"] and event["event_id"]


def test_sdk_non_streamed_message(gw: GatewayProcess, fake_provider: Any) -> None:
    prompt = "once please fake:tokens=5"
    direct = anthropic.Anthropic(base_url=fake_provider.base_url, api_key="x", max_retries=0)
    expected = direct.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": prompt}])
    raw = sdk(gw).messages.with_raw_response.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": prompt}])
    message = raw.parse()
    got, want = message.content[0], expected.content[0]
    assert got.type == "text" and want.type == "text" and got.text == want.text
    assert message.usage.output_tokens == expected.usage.output_tokens == 5
    assert raw.headers["X-Cody-Resolved-Model"] == f"anthropic/{MODEL}"
    assert raw.headers["X-Span"] == raw.headers["X-Trace-Span"]
    meta = gw.wait_events(1, "CompletionsFinished")[0]["metadata"]
    assert meta["stream"] is False and meta["completion_token_count"] == 5
    assert meta["prompt_token_count"] == expected.usage.input_tokens


def test_request_is_transformed_for_upstream(gw: GatewayProcess, fake_provider: Any) -> None:
    body = {
        "model": "anthropic/" + MODEL,
        "max_tokens": 20,
        "temperature": 0,
        "unknown_field": {"dropped": True},
        "metadata": {"user_id": "client-chosen"},
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are Cody"}]},
            {"role": "user", "content": [{"type": "text", "text": "hello marker-123"}]},
        ],
    }
    response = post(gw, body, headers={"X-Sourcegraph-Actor-UID": "42", "Connection": "keep-alive"})
    assert response.status_code == 200, response.text
    sent = last_fake_request(fake_provider.base_url)
    assert sent["body"] == {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello marker-123"}]}],
        "model": MODEL,
        "max_tokens": 20,
        "temperature": 0,
        "metadata": {"user_id": "actor-a:42"},
        "system": "You are Cody",
    }
    headers = {k.lower(): v for k, v in sent["headers"].items()}
    assert headers["x-api-key"] == ANTHROPIC_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers  # the client's token never goes upstream
    assert response.headers["X-Cody-Resolved-Model"] == f"anthropic/{MODEL}"
    assert "set-cookie" not in response.headers
    meta = gw.wait_events(1, "CompletionsFinished")[0]["metadata"]
    assert meta["sg.actor"] == {"UID": 42} and meta["sg_actor_id"] == "42"
    assert meta["trace_id"] == response.headers["X-Trace"]


def test_bad_inputs_get_json_errors_and_no_event_is_lost(gw: GatewayProcess) -> None:
    assert_json_error(post(gw, message_body(), token="sgd_" + "z" * 64), 401, "invalid token format")
    assert_json_error(post(gw, message_body(), token="slk_abc"), 401, "invalid token format")
    assert_json_error(post(gw, message_body(), token="not-a-known-token"), 401, "token not from source")
    assert_json_error(post(gw, message_body(), headers={"Authorization": "Basic abc"}, token=None), 400, "invalid token type Basic")
    assert_json_error(post(gw, message_body(), headers={"Authorization": "Bearer"}, token=None), 400, "token type missing")
    assert_json_error(post(gw, message_body(), token=None), 403, "access not enabled")
    assert_json_error(post(gw, message_body(), feature=None), 400, "X-Sourcegraph-Feature header is required")
    assert_json_error(post(gw, message_body(), feature="embeddings"), 400, "invalid value for X-Sourcegraph-Feature")
    body = assert_json_error(post(gw, message_body(model="claude-2-secret-model")), 400, "is not allowed")
    assert body["error"].startswith('model "anthropic/claude-2-secret-model" is not allowed, allowed: [anthropic/claude-v1,')
    assert_json_error(post(gw, None, raw=b"{not json"), 400, "failed to parse request body")
    assert_json_error(post(gw, None, raw=b"[1,2]"), 400, "failed to parse request body")
    assert_json_error(post(gw, {"model": MODEL, "max_tokens": "ten", "messages": []}), 400, "max_tokens")
    assert_json_error(post(gw, {"model": MODEL, "max_tokens": 10}), 400, 'must contain "messages"')
    # Issue 15: the cap is per model (claude-3-haiku's documented output limit is 4,096), not one 4,000 cap.
    assert_json_error(post(gw, message_body(max_tokens=4097)), 400, "max_tokens exceeds maximum allowed value of 4096: 4097")
    assert_json_error(post(gw, message_body(), headers={"X-Timeout-Ms": "soon"}), 400, "X-Timeout-Ms")
    big = json.dumps(message_body("x" * (11 * 1024 * 1024))).encode()
    assert_json_error(post(gw, None, raw=big), 413, "too large")
    assert_json_error(httpx.get(gw.base_url + "/v1/nope", timeout=10), 404, "404 page not found")
    assert_json_error(httpx.post(gw.base_url + "/-/nope", timeout=10), 404)
    assert_json_error(httpx.get(gw.base_url + ROUTE, headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=10), 405)

    # Only the one valid request reaches the upstream and produces a CompletionsFinished.
    ok = post(gw, message_body())
    assert ok.status_code == 200
    # Events are flushed in recording order, so once the last request's event is
    # written, any (wrong) event from the rejected requests would be there too.
    gw.wait_events(1, "CompletionsFinished")
    assert len(gw.events("CompletionsFinished")) == 1
    assert len(gw.events("AccessDenied")) == 1


def test_rate_limit_429_headers_and_event(start_gateway: Any) -> None:
    gw = start_gateway([actor("limited", TOKEN_A, chat_completions=limits(2, "1h"))])
    assert post(gw, message_body()).status_code == 200
    assert post(gw, message_body()).status_code == 200
    response = post(gw, message_body())
    body = assert_json_error(response, 429, "you have exceeded the rate limit of 2 requests")
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["X-RateLimit-Limit"] == "2"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert int(response.headers["X-RateLimit-Reset"]) > 0
    assert "Retry after" in body["error"]
    limited = gw.wait_events(1, "RateLimited")[0]
    assert limited["metadata"]["cause"] == "quota" and limited["metadata"]["limit"] == 2


def test_upstream_errors_are_refunded_and_429_becomes_503(start_gateway: Any) -> None:
    gw = start_gateway([actor("limited", TOKEN_A, chat_completions=limits(2, "1h"))])
    response = post(gw, message_body("fake:status=429"), headers={"X-Timeout-Ms": "5000"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert response.json()["type"] == "error"  # the provider's own error body is relayed
    bad = post(gw, message_body("fake:status=400"))
    assert bad.status_code == 400
    # Neither failure consumed quota: two successes still fit in the limit of 2.
    assert post(gw, message_body()).status_code == 200
    assert post(gw, message_body()).status_code == 200
    events = gw.wait_events(4, "CompletionsFinished")
    statuses = sorted((e["metadata"]["upstream_status_code"], e["metadata"]["resolved_status_code"]) for e in events)
    assert (429, 503) in statuses and (400, 400) in statuses


def test_timeout_before_first_byte_is_504(gw: GatewayProcess) -> None:
    response = post(gw, message_body("fake:ttft_ms=3000", stream=True), headers={"X-Timeout-Ms": "300"})
    assert_json_error(response, 504, "timed out")
    meta = gw.wait_events(1, "CompletionsFinished")[0]["metadata"]
    assert meta["resolved_status_code"] == 504 and meta["upstream_status_code"] is None


def test_upstream_failure_after_first_byte_is_in_band(gw: GatewayProcess) -> None:
    response = post(gw, message_body("fake:tokens=10 fake:disconnect_after=3", stream=True))
    assert response.status_code == 200
    assert "event: error" in response.text
    meta = gw.wait_events(1, "CompletionsFinished")[0]["metadata"]
    assert meta["outcome"] == "upstream_error" and meta["completion_token_count"] is not None


def open_stream(gw: GatewayProcess, body: dict[str, Any]) -> tuple[socket.socket, bytes]:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    request = (
        f"POST {ROUTE} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN_A}\r\n"
        f"X-Sourcegraph-Feature: chat_completions\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    sock.sendall(request)
    received = b""
    while b"content_block_delta" not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return sock, received


def test_client_disconnect_releases_slot_and_yields_one_event(start_gateway: Any, fake_provider: Any) -> None:
    gw = start_gateway([actor("one-at-a-time", TOKEN_A, chat_completions=limits(100, "1h", concurrentRequests=1))])
    httpx.post(fake_provider.base_url + "/_fake/reset", timeout=10)
    sock, received = open_stream(gw, message_body("fake:tokens=200 fake:tokens_per_s=20", stream=True))
    assert received.startswith(b"HTTP/1.1 200")
    # The slot is held: a second request is refused for concurrency.
    busy = post(gw, message_body())
    assert_json_error(busy, 429, "concurrency limit of 1")
    sock.close()
    # The upstream request is cancelled and the slot comes back.
    wait_until(lambda: httpx.get(fake_provider.base_url + "/_fake/stats", timeout=10).json()["in_flight"] == 0, 10, what="upstream cancelled")
    wait_until(lambda: post(gw, message_body()).status_code == 200, 10, what="slot released")
    events = gw.wait_events(2, "CompletionsFinished")
    disconnected = [e for e in events if e["metadata"]["outcome"] == "client_disconnected"]
    assert len(disconnected) == 1
    assert disconnected[0]["metadata"]["completion_character_count"]


def test_diagnostics(gw: GatewayProcess) -> None:
    version = httpx.get(gw.base_url + "/-/__version", timeout=10)
    assert version.status_code == 200 and version.text
    assert_json_error(httpx.get(gw.base_url + "/-/healthz", timeout=10), 401)
    assert_json_error(httpx.get(gw.base_url + "/-/healthz", headers={"Authorization": "Bearer wrong"}, timeout=10), 401)
    health = httpx.get(gw.base_url + "/-/healthz", headers={"Authorization": f"Bearer {DIAGNOSTICS_SECRET}"}, timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_bad_config_names_every_bad_key(tmp_path: Any) -> None:
    import subprocess
    import sys

    from fakes.processes import REPO

    bad = tmp_path / "bad.toml"
    bad.write_text('port = "eighty"\nno_such_key = 1\n[upstream]\nmax_clients = 0\n')
    result = subprocess.run(
        [sys.executable, str(REPO / "gateway.py"), "--config", str(bad)],
        capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "CODY_GATEWAY_REDIS_FAILURE_POLICY": "maybe"},
    )
    assert result.returncode == 2
    for key in ("port", "no_such_key", "upstream.max_clients", "redis.failure_policy"):
        assert key in result.stderr, result.stderr


def test_rejection_before_the_body_says_connection_close(gw: GatewayProcess) -> None:
    response = post(gw, message_body(), token="sgd_" + "c" * 64)
    assert response.status_code == 401
    assert response.headers.get("Connection", "").lower() == "close"
    ok = post(gw, message_body())
    assert ok.status_code == 200 and ok.headers.get("Connection", "").lower() != "close"
