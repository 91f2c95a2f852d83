"""The fake provider speaks each provider's wire format and obeys its directives.

The server runs on its own event loop in a background thread (one per module),
so the official SDKs and plain sockets can talk to it synchronously.
"""

from __future__ import annotations

import array
import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import openai
import pytest

from fakes.provider import (
    COMPLETION_WORDS,
    FakeProvider,
    completion_text,
    embedding_vector,
    start_fake_provider,
)

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


class LoopThread:
    """An asyncio loop in a daemon thread, for servers the sync tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-provider-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def fake(loop_thread: LoopThread) -> Iterator[FakeProvider]:
    provider = loop_thread.run(start_fake_provider(stall_cap_s=20))
    yield provider
    loop_thread.run(provider.stop())


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    if "fake" in request.fixturenames:
        provider: FakeProvider = request.getfixturevalue("fake")
        assert _post(provider, "/_fake/reset", b"").status == 200


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def _post(
    fake: FakeProvider, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    try:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def _get_json(fake: FakeProvider, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _stats(fake: FakeProvider) -> dict[str, int]:
    return _get_json(fake, "/_fake/stats")


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.1f} s")
        time.sleep(0.01)


def _sse(raw: bytes, sep: bytes = b"\n\n") -> list[tuple[str | None, str]]:
    """(event name, data) per event; asserts the stream ends on a separator."""
    assert raw.endswith(sep), raw[-80:]
    events = []
    for block in raw[: -len(sep)].split(sep):
        name = None
        data = None
        for line in block.decode().split("\r\n" if sep == b"\r\n\r\n" else "\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            else:
                assert field == "data", line
                data = value
        assert data is not None, block
        events.append((name, data))
    return events


def _raw_stream(fake: FakeProvider, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    """Sends a request on a raw socket and returns everything until the server closes."""
    payload = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as sock:
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n" % path.encode()
            + extra.encode()
            + b"Content-Length: %d\r\n\r\n" % len(payload)
            + payload
        )
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def _dechunk(raw: bytes) -> tuple[bytes, bytes, bool]:
    """(head, body, complete) of a chunked HTTP/1.1 response."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return head, body, True
        body += rest[:size]
        rest = rest[size + 2 :]
    return head, body, False


def _anthropic(fake: FakeProvider, max_retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.base_url, api_key="sk-ant-test", max_retries=max_retries)


def _openai(fake: FakeProvider) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url + "/v1", api_key="sk-test", max_retries=0)


# Sent by both SDKs (each with its own TypedDicts) and as raw JSON.
USER: list[Any] = [{"role": "user", "content": "hello there"}]


# Anthropic Messages ----------------------------------------------------------


def test_anthropic_sdk_stream_text_usage_and_request_headers(fake: FakeProvider) -> None:
    with _anthropic(fake) as client:
        with client.messages.stream(
            model="claude-3-haiku-20240307",
            max_tokens=100,
            system="be brief",
            messages=[{"role": "user", "content": "hello there fake:tokens=5"}],
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    assert text == completion_text(5) == "Hello from the fake provider"
    # 2 words of system + 3 of the message (the directive is a word too).
    assert final.usage.input_tokens == 5
    assert final.usage.output_tokens == 5
    assert final.stop_reason == "end_turn"
    assert final.model == "claude-3-haiku-20240307"
    (logged,) = _get_json(fake, "/_fake/requests")
    assert logged["method"] == "POST" and logged["path"] == "/v1/messages"
    # SDK versions differ in where the key goes and which API version they pin.
    assert "sk-ant-test" in (logged["headers"].get("x-api-key"), logged["headers"].get("authorization", "")[7:])
    assert logged["headers"]["anthropic-version"] >= "2023-06-01"
    assert logged["body"]["stream"] is True and logged["body"]["system"] == "be brief"


def test_anthropic_stream_framing_is_byte_exact(fake: FakeProvider) -> None:
    body = {"model": "m", "max_tokens": 3, "stream": True, "messages": USER}
    head, raw, complete = _dechunk(_raw_stream(fake, "/v1/messages", body, {"X-Fake-Tokens": "3"}))
    assert complete
    assert b"content-type: text/event-stream; charset=utf-8" in head.lower()
    events = _sse(raw)
    names = [name for name, _ in events]
    assert names == [
        "message_start", "content_block_start", "ping",
        "content_block_delta", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    for name, data in events:
        assert json.loads(data)["type"] == name
    start = json.loads(events[0][1])["message"]
    assert start["usage"] == {"input_tokens": 2, "output_tokens": 1}
    assert start["role"] == "assistant" and start["content"] == [] and start["id"].startswith("msg_")
    assert json.loads(events[3][1]) == {
        "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"},
    }  # fmt: skip
    delta = json.loads(events[-2][1])
    # max_tokens == tokens: the model stopped on the limit.
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"] == {"output_tokens": 3}
    assert raw.startswith(b'event: message_start\ndata: {"type":"message_start"')


def test_anthropic_sdk_non_stream(fake: FakeProvider) -> None:
    with _anthropic(fake) as client:
        message = client.messages.create(model="claude-3-5-sonnet-20240620", max_tokens=50, messages=USER)
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text == completion_text(20)
    assert message.usage.input_tokens == 2 and message.usage.output_tokens == 20
    assert message.stop_reason == "end_turn" and message.id.startswith("msg_")


def test_anthropic_error_status_retry_after_and_shape(fake: FakeProvider) -> None:
    with _anthropic(fake) as client:
        with pytest.raises(anthropic.RateLimitError) as limited:
            client.messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "hi fake:status=429 fake:retry_after=7"}]
            )
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            client.messages.create(model="m", max_tokens=5, messages=USER, extra_headers={"X-Fake-Status": "529"})
    assert limited.value.status_code == 429
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Number of request tokens has exceeded your per-minute rate limit"},
    }
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert "retry-after" not in overloaded.value.response.headers


def test_fail_times_fails_first_requests_per_key(fake: FakeProvider) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x fake:fail_times=2 fake:fail_key=k1"}]}
    other = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x fake:fail_times=1 fake:fail_key=k2"}]}
    statuses = [_post(fake, "/v1/messages", body).status for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert [_post(fake, "/v1/messages", other).status for _ in range(2)] == [500, 200]
    # The SDK's own retries, honouring a fractional Retry-After, get through.
    with _anthropic(fake, max_retries=2) as client:
        message = client.messages.create(
            model="m", max_tokens=50,
            messages=[{"role": "user", "content": "x fake:fail_times=2 fake:fail_key=k3 fake:status=529 fake:retry_after=0.01"}],
        )  # fmt: skip
    assert message.usage.output_tokens == 20
    attempts = [e for e in _get_json(fake, "/_fake/requests") if "k3" in e["body"]["messages"][0]["content"]]
    assert len(attempts) == 3


def test_anthropic_error_after_sends_in_band_error(fake: FakeProvider) -> None:
    with _anthropic(fake) as client:
        with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
            with client.messages.stream(
                model="m", max_tokens=50, messages=[{"role": "user", "content": "x fake:error_after=2"}]
            ) as stream:
                for _ in stream.text_stream:
                    pass
    body = {"model": "m", "stream": True, "max_tokens": 50, "messages": USER}
    _, raw, complete = _dechunk(_raw_stream(fake, "/v1/messages", body, {"X-Fake-Error-After": "2", "X-Fake-Status": "500"}))
    assert complete
    events = _sse(raw)
    assert [name for name, _ in events][-3:] == ["content_block_delta", "content_block_delta", "error"]
    assert json.loads(events[-1][1]) == {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}


def test_disconnect_after_truncates_the_stream(fake: FakeProvider) -> None:
    received = []
    with _anthropic(fake) as client:
        # The SDK lets the transport's error through mid-stream.
        with pytest.raises(Exception, match="incomplete chunked read"):
            with client.messages.stream(
                model="m", max_tokens=50, messages=[{"role": "user", "content": "x fake:disconnect_after=3"}]
            ) as stream:
                for text in stream.text_stream:
                    received.append(text)
    assert "".join(received) == completion_text(3)
    body = {"model": "gpt-4o", "stream": True, "messages": USER}
    _, raw, complete = _dechunk(_raw_stream(fake, "/v1/chat/completions", body, {"X-Fake-Disconnect-After": "2"}))
    assert not complete
    assert len(_sse(raw)) == 3  # the role chunk and two content chunks, no [DONE]
    # Non-streamed: the declared Content-Length is never reached.
    with pytest.raises(http.client.IncompleteRead):
        _post(fake, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER}, {"X-Fake-Disconnect-After": "10"})


def test_stall_after_keeps_connection_open_until_client_leaves(fake: FakeProvider) -> None:
    payload = json.dumps({"model": "m", "stream": True, "max_tokens": 50, "messages": USER}).encode()
    sock = socket.create_connection(("127.0.0.1", fake.port), timeout=10)
    try:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Fake-Stall-After: 2\r\nContent-Length: %d\r\n\r\n" % len(payload)
            + payload
        )
        seen = b""
        while seen.count(b"content_block_delta\n") < 2:
            seen += sock.recv(65536)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
        assert _stats(fake)["in_flight"] == 1
    finally:
        sock.close()
    _wait_for(lambda: _stats(fake)["in_flight"] == 0)
    assert _stats(fake)["client_disconnects"] == 1


def test_stats_count_concurrent_requests(fake: FakeProvider) -> None:
    payload = json.dumps({"model": "m", "messages": USER}).encode()
    socks = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", fake.port), timeout=10)
            socks.append(sock)
            sock.sendall(
                b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Fake-Ttft-Ms: 60000\r\nContent-Length: %d\r\n\r\n"
                % len(payload)
                + payload
            )
        _wait_for(lambda: _stats(fake)["in_flight"] == 3)
    finally:
        for sock in socks:
            sock.close()
    _wait_for(lambda: _stats(fake)["in_flight"] == 0)
    assert _stats(fake) == {"in_flight": 0, "max_in_flight": 3, "total": 3, "client_disconnects": 3}
    assert _post(fake, "/_fake/reset", b"").json() == {"in_flight": 0, "max_in_flight": 0, "total": 0, "client_disconnects": 0}
    assert _get_json(fake, "/_fake/requests") == []


def test_pacing_ttft_and_tokens_per_second(fake: FakeProvider) -> None:
    body = {"model": "m", "stream": True, "max_tokens": 50, "messages": [{"role": "user", "content": "fake:ttft_ms=150"}]}
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    try:
        started = time.monotonic()
        conn.request("POST", "/v1/messages", body=json.dumps(body), headers={"X-Fake-Tokens": "6", "X-Fake-Tokens-Per-S": "50"})
        response = conn.getresponse()
        first = time.monotonic() - started
        rest = response.read()
        total = time.monotonic() - started
    finally:
        conn.close()
    assert rest.count(b"content_block_delta\n") == 6
    assert 0.14 <= first < 1.0
    assert 0.14 + 5 / 50 <= total < 1.5


# Anthropic legacy completions ---------------------------------------------------


def test_legacy_complete_stream_cumulative_before_2023_06_01(fake: FakeProvider) -> None:
    body = {"model": "claude-2", "prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": 30, "stream": True}
    _, raw, _ = _dechunk(_raw_stream(fake, "/v1/complete", body, {"anthropic-version": "2023-01-01", "X-Fake-Tokens": "3"}))
    events = _sse(raw)
    assert all(name is None for name, _ in events)
    assert events[-1][1] == "[DONE]"
    completions = [json.loads(data)["completion"] for _, data in events[:-1]]
    assert completions == ["Hello", "Hello from", "Hello from the", "Hello from the"]
    assert json.loads(events[-2][1])["stop_reason"] == "stop_sequence"


def test_legacy_complete_stream_incremental_and_non_stream(fake: FakeProvider) -> None:
    body = {"model": "claude-2", "prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": 3, "stream": True}
    _, raw, _ = _dechunk(_raw_stream(fake, "/v1/complete", body, {"anthropic-version": "2023-06-01", "X-Fake-Tokens": "3"}))
    events = _sse(raw)
    assert [name for name, _ in events] == ["ping", "completion", "completion", "completion", "completion"]
    parsed = [json.loads(data) for _, data in events[1:]]
    assert "".join(p["completion"] for p in parsed) == completion_text(3)
    assert [p["stop_reason"] for p in parsed] == [None, None, None, "max_tokens"]
    reply = _post(fake, "/v1/complete", {**body, "stream": False})
    assert reply.status == 200
    assert reply.json()["completion"] == completion_text(20)
    assert reply.json()["stop_reason"] == "max_tokens" and reply.json()["model"] == "claude-2"


# OpenAI -------------------------------------------------------------------------


def test_openai_sdk_stream_with_usage_chunk(fake: FakeProvider) -> None:
    with _openai(fake) as client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o", messages=USER, stream=True, stream_options={"include_usage": True},
                extra_headers={"X-Fake-Tokens": "4"},
            )
        )  # fmt: skip
        without = list(client.chat.completions.create(model="gpt-4o", messages=USER, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == completion_text(4)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, chunks[-1].usage.total_tokens) == (2, 4, 6)
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in without) and without[-1].choices[0].finish_reason == "stop"
    logged = _get_json(fake, "/_fake/requests")[0]
    assert logged["headers"]["authorization"] == "Bearer sk-test"


def test_openai_raw_framing_ends_with_done(fake: FakeProvider) -> None:
    body = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}, "messages": USER}
    _head, raw, complete = _dechunk(_raw_stream(fake, "/v1/chat/completions", body, {"X-Fake-Tokens": "2"}))
    assert complete
    events = _sse(raw)
    assert all(name is None for name, _ in events)
    assert events[-1][1] == "[DONE]"
    assert json.loads(events[-2][1])["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert raw.startswith(b'data: {"id":"chatcmpl-') and raw.endswith(b"}\n\ndata: [DONE]\n\n")


def test_openai_sdk_non_stream_and_error(fake: FakeProvider) -> None:
    with _openai(fake) as client:
        completion = client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=20)
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="gpt-4o", messages=USER, extra_headers={"X-Fake-Status": "429", "X-Fake-Retry-After": "30"})
    assert completion.choices[0].message.content == completion_text(20)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 20 and completion.usage.prompt_tokens == 2
    assert limited.value.response.headers["retry-after"] == "30"
    assert limited.value.body == {
        "message": "Rate limit reached for requests.", "type": "requests", "param": None, "code": "rate_limit_exceeded",
    }  # fmt: skip


def test_openai_sdk_stream_in_band_error(fake: FakeProvider) -> None:
    with _openai(fake) as client:
        with pytest.raises(openai.APIError, match="server had an error"):
            for _ in client.chat.completions.create(model="gpt-4o", messages=USER, stream=True, extra_headers={"X-Fake-Error-After": "1"}):
                pass


def test_openai_embeddings_deterministic_vectors(fake: FakeProvider) -> None:
    with _openai(fake) as client:
        small = client.embeddings.create(model="text-embedding-3-small", input=["hello world", "one two three"])
        again = client.embeddings.create(model="text-embedding-3-small", input="hello world")
        large = client.embeddings.create(model="text-embedding-3-large", input="x", encoding_format="float")
        ada = client.embeddings.create(model="text-embedding-ada-002", input=["x"], encoding_format="float")
    assert [d.index for d in small.data] == [0, 1]
    assert small.data[0].embedding == embedding_vector("hello world", 1536) == again.data[0].embedding
    assert small.usage.prompt_tokens == 5 and small.usage.total_tokens == 5
    assert len(large.data[0].embedding) == 3072 and len(ada.data[0].embedding) == 1536
    # The float form is the same float32 vector printed with 9 significant digits.
    as_f32 = array.array("f", ada.data[0].embedding).tolist()
    assert as_f32 == embedding_vector("x", 1536)
    assert abs(sum(v * v for v in as_f32) - 1.0) < 1e-5
    assert ada.model == "text-embedding-ada-002"


# Fireworks ----------------------------------------------------------------------


def test_fireworks_chat_stream_usage_on_last_chunk(fake: FakeProvider) -> None:
    body = {"model": "accounts/fireworks/models/mixtral-8x7b-instruct", "stream": True, "messages": USER}
    _, raw, complete = _dechunk(_raw_stream(fake, "/inference/v1/chat/completions", body, {"X-Fake-Tokens": "3"}))
    assert complete
    events = [data for _, data in _sse(raw)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == completion_text(3)
    assert [c["usage"] for c in chunks[:-1]] == [None] * 4
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    reply = _post(fake, "/inference/v1/chat/completions", {**body, "stream": False})
    assert reply.json()["choices"][0]["message"]["content"] == completion_text(20)
    assert reply.json()["usage"]["completion_tokens"] == 20


def test_fireworks_completions_text_and_usage(fake: FakeProvider) -> None:
    body = {"model": "starcoder", "prompt": "def add(a, b):", "max_tokens": 4, "stream": True}
    _, raw, _ = _dechunk(_raw_stream(fake, "/inference/v1/completions", body, {"X-Fake-Tokens": "4"}))
    events = [data for _, data in _sse(raw)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == completion_text(4)
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    reply = _post(fake, "/inference/v1/completions", {**body, "stream": False}).json()
    assert reply["choices"][0]["text"] == completion_text(20) and reply["usage"]["prompt_tokens"] == 3


# Google Gemini --------------------------------------------------------------------


GEMINI_BODY = {
    "model": "gemini-1.5-flash",
    "contents": [{"role": "user", "parts": [{"text": "say something nice"}]}],
    "generationConfig": {"maxOutputTokens": 100},
}


def test_gemini_sse_stream(fake: FakeProvider) -> None:
    path = "/v1beta/models/gemini-1.5-flash:streamGenerateContent?key=AIza-test&alt=sse"
    head, raw, complete = _dechunk(_raw_stream(fake, path, GEMINI_BODY, {"X-Fake-Tokens": "3"}))
    assert complete and b"content-type: text/event-stream" in head.lower()
    chunks = [json.loads(data) for _, data in _sse(raw, b"\r\n\r\n")]
    assert len(chunks) == 3
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == completion_text(3)
    assert [c["usageMetadata"]["candidatesTokenCount"] for c in chunks] == [1, 2, 3]
    assert chunks[-1]["usageMetadata"] == {"promptTokenCount": 3, "candidatesTokenCount": 3, "totalTokenCount": 6}
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert "finishReason" not in chunks[0]["candidates"][0]
    logged = _get_json(fake, "/_fake/requests")[0]
    assert logged["query"] == {"key": "AIza-test", "alt": "sse"}
    assert logged["path"] == "/v1beta/models/gemini-1.5-flash:streamGenerateContent"


def test_gemini_non_stream_json_array_stream_and_error(fake: FakeProvider) -> None:
    reply = _post(fake, "/v1beta/models/gemini-1.5-pro:generateContent?key=k", GEMINI_BODY)
    assert reply.status == 200
    parsed = reply.json()
    assert parsed["candidates"][0]["content"]["parts"][0]["text"] == completion_text(20)
    assert parsed["usageMetadata"] == {"promptTokenCount": 3, "candidatesTokenCount": 20, "totalTokenCount": 23}
    array_stream = _post(fake, "/v1beta/models/gemini-1.5-pro:streamGenerateContent?key=k", GEMINI_BODY, {"X-Fake-Tokens": "2"})
    assert len(array_stream.json()) == 2
    error = _post(fake, "/v1beta/models/gemini-1.5-pro:generateContent?key=k", GEMINI_BODY, {"X-Fake-Status": "429"})
    assert error.status == 429
    assert error.json() == {
        "error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED"}
    }


# KServe ---------------------------------------------------------------------------


def test_kserve_infer_embeddings(fake: FakeProvider) -> None:
    body = {"id": "req-1", "inputs": [{"name": "TEXT", "shape": [2], "datatype": "BYTES", "data": ["alpha", "beta"]}]}
    reply = _post(fake, "/v2/models/st-multi-qa-mpnet-base-dot-v1/infer", body, {"sourcegraph-smega-inference-auth": "t"})
    assert reply.status == 200
    parsed = reply.json()
    assert parsed["model_name"] == "st-multi-qa-mpnet-base-dot-v1" and parsed["id"] == "req-1"
    (output,) = parsed["outputs"]
    assert output["name"] == "embeddings" and output["shape"] == [2, 768] and output["datatype"] == "FP32"
    assert len(output["data"]) == 2 * 768
    assert array.array("f", output["data"][768:]).tolist() == embedding_vector("beta", 768)
    assert _get_json(fake, "/_fake/requests")[0]["headers"]["sourcegraph-smega-inference-auth"] == "t"


# Content directives -----------------------------------------------------------------


def test_malformed_content_type_no_usage_input_tokens(fake: FakeProvider) -> None:
    broken = _post(fake, "/v1/chat/completions", {"model": "gpt-4o", "messages": USER}, {"X-Fake-Malformed": "1"})
    assert broken.status == 200
    with pytest.raises(ValueError):
        broken.json()
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x fake:malformed=true"}]}
    events = _sse(_dechunk(_raw_stream(fake, "/v1/chat/completions", body, {"X-Fake-Tokens": "2"}))[1])
    with pytest.raises(ValueError):
        json.loads(events[1][1])
    assert json.loads(events[2][1])["choices"][0]["delta"]["content"] == " from"
    typed = _post(fake, "/v1/messages", {"model": "m", "messages": USER}, {"X-Fake-Content-Type": "text/plain; charset=utf-8"})
    assert typed.headers["Content-Type"] == "text/plain; charset=utf-8"
    bare = _post(fake, "/v1/messages", {"model": "m", "messages": [{"role": "user", "content": "fake:no_usage=1"}]}).json()
    assert "usage" not in bare
    counted = _post(fake, "/v1/messages", {"model": "m", "messages": USER}, {"X-Fake-Input-Tokens": "1234"}).json()
    assert counted["usage"] == {"input_tokens": 1234, "output_tokens": 20}


def test_huge_event_and_invalid_utf8(fake: FakeProvider) -> None:
    body = {"model": "m", "stream": True, "max_tokens": 9, "messages": USER}
    _, raw, _ = _dechunk(_raw_stream(fake, "/v1/messages", body, {"X-Fake-Huge-Event-Bytes": "2000000", "X-Fake-Tokens": "2"}))
    events = _sse(raw)
    assert json.loads(events[3][1])["delta"]["text"] == "x" * 2_000_000
    _, raw, _ = _dechunk(_raw_stream(fake, "/v1/messages", body, {"X-Fake-Invalid-Utf8": "1"}))
    assert b"Hello\xff\xfe" in raw
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")


def test_body_directives_override_headers_and_bad_values_are_ignored(fake: FakeProvider) -> None:
    content = "fake:tokens=3 fake:tokens=4 fake:ttft_ms=abc fake:bogus=1 fake:status=99"
    reply = _post(fake, "/v1/messages", {"model": "m", "messages": [{"role": "user", "content": content}]}, {"X-Fake-Tokens": "9"})
    assert reply.status == 200
    assert reply.json()["usage"]["output_tokens"] == 4  # the last body directive wins


def test_invalid_json_and_unknown_route(fake: FakeProvider) -> None:
    bad = _post(fake, "/v1/messages", b"{not json")
    assert bad.status == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert _get_json(fake, "/_fake/requests")[0]["body"] == "{not json"
    missing = _post(fake, "/v1/nope", {})
    assert missing.status == 404 and missing.json()["error"]["type"] == "not_found_error"


# Server lifecycle ---------------------------------------------------------------------


def test_request_log_is_bounded_and_stop_ends_stalled_streams(loop_thread: LoopThread) -> None:
    provider = loop_thread.run(start_fake_provider(request_log_size=2, tokens=1))
    sock = socket.create_connection(("127.0.0.1", provider.port), timeout=10)
    try:
        for word in COMPLETION_WORDS[:3]:
            assert _post(provider, "/v1/messages", {"model": word, "messages": USER}).status == 200
        assert [entry["body"]["model"] for entry in _get_json(provider, "/_fake/requests")] == list(COMPLETION_WORDS[1:3])
        payload = json.dumps({"model": "m", "stream": True, "messages": USER}).encode()
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Fake-Stall-After: 0\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
        _wait_for(lambda: provider.stats()["in_flight"] == 1)
    finally:
        loop_thread.run(provider.stop(), timeout=5)
        sock.close()
    assert provider.stats()["in_flight"] == 0


def test_make_app_rejects_unknown_options(loop_thread: LoopThread) -> None:
    with pytest.raises(TypeError):
        loop_thread.run(start_fake_provider(tokenz=3))


@pytest.mark.timeout(20)
def test_cli_prints_listening_line_serves_and_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "fakes.provider", "--port", "0", "--tokens", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("fake provider listening on http://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/messages", body=json.dumps({"model": "m", "messages": USER}))
        assert json.loads(conn.getresponse().read())["usage"]["output_tokens"] == 2
        conn.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
