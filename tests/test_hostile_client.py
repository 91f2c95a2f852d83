"""Limits on everything a client controls, through a real gateway.

Body size, header size, message count, max_tokens, X-Timeout-Ms, stream
duration; slow-loris clients (headers or body trickled) are cut off without
holding an upstream call or a concurrency slot; a client that reads too
slowly gets its stream ended instead of an unbounded buffer.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes.processes import wait_until
from tests.support.error_shapes import error_message
from tests.test_fuzz_support import full_env, start_full_gateway, unlimited_actor

TOKEN = "sgd_" + "c" * 64
SLOT_TOKEN = "sgd_" + "d" * 64
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Sourcegraph-Feature": "chat_completions"}
MAX_BODY = 65536
MAX_HEADER = 8192
MAX_MESSAGES = 50
BODY_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 1.5
MAX_TIMEOUT_MS = 1500
CLIENT_BUFFER = 65536

ANTHROPIC = "/v1/completions/anthropic-messages"


def limits_env(workdir: Path, fake_base: str, **extra: str) -> dict[str, str]:
    return full_env(
        workdir,
        fake_base,
        CODY_GATEWAY_SERVER_MAX_BODY_BYTES=str(MAX_BODY),
        CODY_GATEWAY_SERVER_MAX_HEADER_BYTES=str(MAX_HEADER),
        CODY_GATEWAY_SERVER_MAX_MESSAGES=str(MAX_MESSAGES),
        CODY_GATEWAY_SERVER_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        CODY_GATEWAY_SERVER_IDLE_CONNECTION_TIMEOUT_S=str(IDLE_TIMEOUT_S),
        CODY_GATEWAY_SERVER_MAX_CLIENT_BUFFER_BYTES=str(CLIENT_BUFFER),
        CODY_GATEWAY_UPSTREAM_MAX_TIMEOUT_MS=str(MAX_TIMEOUT_MS),
        CODY_GATEWAY_UPSTREAM_STALL_TIMEOUT_S="30",
        CODY_GATEWAY_UPSTREAM_RETRY_MAX_ATTEMPTS="1",
        **extra,
    )


def slot_actor() -> dict[str, Any]:
    one = {"limit": 100000, "interval": "1h", "allowedModels": ["*"], "concurrentRequests": 1}
    return {"id": "one-slot", "name": "one-slot", "accessEnabled": True, "token": SLOT_TOKEN,
            "rateLimits": {"chat_completions": one, "code_completions": one}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fake_provider: Any) -> Iterator[Any]:
    workdir = tmp_path_factory.mktemp("hostile-client")
    gateway = start_full_gateway(workdir, limits_env(workdir, fake_provider.base_url), [unlimited_actor("limits", TOKEN), slot_actor()], name="limits gateway")
    yield gateway
    gateway.stop()


def messages_body(n: int = 1, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "claude-3-haiku-20240307", "max_tokens": 20, "messages": [{"role": "user", "content": text}] * n, **extra}


def assert_error(response: httpx.Response, status: int, pattern: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert re.search(pattern, error_message(body, response.request.url.path)), body


def raw(port: int, data: bytes, *, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out


def fake_stats(fake: Any) -> dict[str, int]:
    return httpx.get(fake.base_url + "/_fake/stats", timeout=5).json()


# -- sizes and counts ---------------------------------------------------------------


def test_body_over_the_cap_is_413_declared_or_chunked(gw: Any) -> None:
    big = json.dumps(messages_body(text="x" * (MAX_BODY + 10))).encode()
    url = gw.base_url + ANTHROPIC
    assert_error(httpx.post(url, content=big, headers=AUTH, timeout=10), 413, "too large")
    # Before authentication: an anonymous client cannot make the gateway read a huge body either.
    assert_error(httpx.post(url, content=big, timeout=10), 413, "too large")
    # Just under the cap is fine.
    ok = json.dumps(messages_body(text="x" * (MAX_BODY - 500))).encode()
    assert httpx.post(url, content=ok, headers=AUTH, timeout=10).status_code == 200


def test_chunked_body_over_the_cap_is_a_json_413(gw: Any) -> None:
    big = json.dumps(messages_body(text="x" * (MAX_BODY + 10))).encode()
    response = httpx.post(gw.base_url + ANTHROPIC, content=iter([big[:40000], big[40000:]]), headers=AUTH, timeout=10)
    assert_error(response, 413, "too large")


def test_header_block_over_the_cap_closes_the_connection(gw: Any) -> None:
    request = b"GET /v1/limits HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * (MAX_HEADER + 100) + b"\r\n\r\n"
    assert raw(gw.port, request) == b""
    # Many small headers adding up to more than the cap: the same.
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(MAX_HEADER // 100 + 5))
    assert raw(gw.port, b"GET /v1/limits HTTP/1.1\r\nHost: gw\r\n" + many + b"\r\n") == b""
    assert httpx.get(gw.base_url + "/-/__version", timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (ANTHROPIC, messages_body(MAX_MESSAGES + 1)),
        ("/v1/completions/openai", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)}),
        ("/v1/completions/fireworks", {"model": "starcoder", "messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)}),
        ("/v1/completions/google", {"model": "gemini-1.5-flash-latest", "contents": [{"role": "user", "parts": [{"text": "hi"}]}] * (MAX_MESSAGES + 1)}),
    ],
)
def test_too_many_messages_is_400(gw: Any, path: str, body: dict[str, Any]) -> None:
    assert_error(httpx.post(gw.base_url + path, json=body, headers=AUTH, timeout=10), 400, "too many")


def test_max_tokens_above_the_configured_maximum_is_400(gw: Any) -> None:
    # Issue 15: the Messages cap is per model (claude-3-haiku's documented limit is 4,096).
    assert_error(httpx.post(gw.base_url + ANTHROPIC, json=messages_body(max_tokens=4097), headers=AUTH, timeout=10), 400, "max_tokens")
    legacy = {"model": "claude-instant-1.2", "max_tokens_to_sample": 4001, "prompt": "\n\nHuman: hi\n\nAssistant:"}
    assert_error(httpx.post(gw.base_url + "/v1/completions/anthropic", json=legacy, headers=AUTH, timeout=10), 400, "max_tokens_to_sample")
    assert_error(httpx.post(gw.base_url + ANTHROPIC, json=messages_body(max_tokens=0), headers=AUTH, timeout=10), 400, "max_tokens")
    assert_error(httpx.post(gw.base_url + ANTHROPIC, json=messages_body(max_tokens=1e300), headers=AUTH, timeout=10), 400, "max_tokens")


# -- X-Timeout-Ms and stream duration ----------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1e3", "1.5", "", "0x10", "9" * 400])
def test_bad_timeout_header_is_400(gw: Any, value: str) -> None:
    response = httpx.post(gw.base_url + ANTHROPIC, json=messages_body(), headers={**AUTH, "X-Timeout-Ms": value}, timeout=10)
    if value == "9" * 400:
        # An absurdly large integer is clamped to upstream.max_timeout_ms, not rejected.
        assert response.status_code == 200, response.text
    else:
        assert_error(response, 400, "X-Timeout-Ms")


def test_timeout_above_the_maximum_is_clamped(gw: Any) -> None:
    """A client asking for a day still gets at most upstream.max_timeout_ms."""
    started = time.monotonic()
    response = httpx.post(gw.base_url + ANTHROPIC, json=messages_body(text="hi fake:stall_after=0"),
                          headers={**AUTH, "X-Timeout-Ms": "86400000"}, timeout=20)
    elapsed = time.monotonic() - started
    assert_error(response, 504, "timed out")
    assert MAX_TIMEOUT_MS / 1000 - 0.2 <= elapsed < MAX_TIMEOUT_MS / 1000 + 3, elapsed


def test_an_endless_stream_is_ended_at_the_deadline_with_one_event(gw: Any) -> None:
    body = messages_body(text="hi fake:tokens=100000 fake:tokens_per_s=200", stream=True)
    started = time.monotonic()
    with httpx.stream("POST", gw.base_url + ANTHROPIC, json=body, headers={**AUTH, "X-Timeout-Ms": "800"}, timeout=20) as response:
        assert response.status_code == 200
        trace = response.headers["x-trace"]
        text = "".join(response.iter_text())
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    assert text.rstrip().endswith("}}") and "event: error" in text.split("content_block_delta")[-1], text[-300:]
    assert "timed out" in text.rsplit("event: error", 1)[1]
    event = wait_until(lambda: [e for e in gw.events("CompletionsFinished") if e["metadata"].get("trace_id") == trace], 10)
    assert len(event) == 1 and event[0]["metadata"]["outcome"] == "upstream_error"


# -- slow clients -----------------------------------------------------------------------------


def test_trickled_headers_are_cut_off(gw: Any) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions/anthropic-messages HTTP/1.1\r\nHost: gw\r\n")
        closed = False
        for _ in range(int(IDLE_TIMEOUT_S * 10) + 40):
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.1)
            except OSError:
                closed = True
                break
        if not closed:
            sock.settimeout(2)
            closed = sock.recv(1024) == b""
    assert closed
    assert time.monotonic() - started < IDLE_TIMEOUT_S + 3


def test_trickled_body_is_cut_off_without_taking_a_slot_or_an_upstream_call(gw: Any, fake_provider: Any) -> None:
    body = json.dumps(messages_body()).encode()
    before = fake_stats(fake_provider)["total"]
    headers = (
        f"POST {ANTHROPIC} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {SLOT_TOKEN}\r\n"
        f"X-Sourcegraph-Feature: chat_completions\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    cut = threading.Event()
    started = time.monotonic()

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(headers)
            try:
                for byte in body:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.05)
            except OSError:
                pass
            sock.settimeout(3)
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
        cut.set()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    time.sleep(0.3)
    # The actor's only concurrency slot is free: the trickling request holds nothing.
    ok = httpx.post(gw.base_url + ANTHROPIC, json=messages_body(), headers={"Authorization": f"Bearer {SLOT_TOKEN}", "X-Sourcegraph-Feature": "chat_completions"}, timeout=10)
    assert ok.status_code == 200, ok.text
    assert cut.wait(BODY_TIMEOUT_S + 5)
    assert time.monotonic() - started < BODY_TIMEOUT_S + 3
    thread.join(5)
    assert fake_stats(fake_provider)["total"] == before + 1  # only the normal request went upstream


def test_a_slow_reader_gets_its_stream_ended_not_buffered(gw: Any, fake_provider: Any) -> None:
    """Megabytes from upstream, a client that does not read: the gateway holds at most
    server.max_client_buffer_bytes, ends the stream in-band, cancels the upstream, records one
    event with outcome client_too_slow and counts it in the metrics."""
    disconnects = fake_stats(fake_provider)["client_disconnects"]
    payload = json.dumps(messages_body(text="hi fake:tokens=30000 fake:tokens_per_s=2000 fake:huge_event_bytes=3000000", stream=True)).encode()
    request = (
        f"POST {ANTHROPIC} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"X-Sourcegraph-Feature: chat_completions\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", gw.port))
    try:
        sock.sendall(request)
        # Do not read until the gateway has given up on this client.
        wait_until(lambda: "reads too slowly" in gw.process.output(), 15, what="slow-reader cut-off")
        received = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    assert b"HTTP/1.1 200" in received[:20]
    found = re.search(rb"X-Trace: (\w+)", received)
    assert found is not None
    trace = found.group(1).decode()
    tail = received[-2000:]
    assert b"event: error" in tail and b"not reading fast enough" in tail, tail[-300:]
    # Far less than the upstream sent (~6 MB): the stream was ended, not buffered.
    assert len(received) < 6_000_000
    events = wait_until(lambda: [e for e in gw.events("CompletionsFinished") if e["metadata"].get("trace_id") == trace], 10)
    assert len(events) == 1 and events[0]["metadata"]["outcome"] == "client_too_slow"
    wait_until(lambda: fake_stats(fake_provider)["client_disconnects"] > disconnects, 10, what="upstream cancelled")
    metrics = httpx.get(gw.base_url + "/metrics", timeout=5)
    assert metrics.status_code == 200
    assert re.search(r'cody_gateway_completions_total\{[^}]*outcome="client_too_slow"[^}]*\} [1-9]', metrics.text), "no client_too_slow in metrics"


# -- aborted uploads must not leak in-flight requests --------------------------------------------


def test_aborted_and_timed_out_uploads_do_not_count_as_in_flight(tmp_path: Path, fake_provider: Any) -> None:
    gateway = start_full_gateway(tmp_path, limits_env(tmp_path, fake_provider.base_url, CODY_GATEWAY_SERVER_DRAIN_TIMEOUT_S="3"),
                                 [unlimited_actor("limits", TOKEN)], name="drain gateway")
    try:
        head = (
            f"POST {ANTHROPIC} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n"
            "X-Sourcegraph-Feature: chat_completions\r\nContent-Length: 1000\r\n\r\n{\"mod"
        ).encode()
        # One client gives up mid-body, one stalls until the body timeout.
        with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
            sock.sendall(head)
            time.sleep(0.2)
        assert raw(gateway.port, head, timeout=BODY_TIMEOUT_S + 5) == b""
        assert httpx.get(gateway.base_url + "/-/__version", timeout=5).status_code == 200
    finally:
        gateway.process.signal(signal.SIGTERM)
        line = gateway.process.wait_for(r"draining (\d+) in-flight", timeout=10)
        gateway.stop()
    assert line.group(1) == "0"


def test_embeddings_dimensions_above_the_models_size_are_400(gw: Any) -> None:
    body = {"model": "text-embedding-3-small", "input": "hi", "dimensions": 5000}
    response = httpx.post(gw.base_url + "/openai/v1/embeddings", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert_error(response, 400, "dimensions")
