"""Raw HTTP fuzzing below any client library: odd methods, paths, headers, framing and bodies.

Whatever arrives on the socket, the gateway answers within a deadline or
closes the connection; it never answers 5xx; every error that reaches the
application is the JSON error shape (a request that Tornado's HTTP layer
rejects before routing gets its bare ``400 Bad Request``, documented in
openapi.yaml); and it keeps serving afterwards, with a clean log.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import DIAGNOSTICS_SECRET
from tests.support.error_shapes import error_message
from tests.test_fuzz_schemathesis import assert_clean_log
from tests.test_fuzz_support import counted, examples, full_env, fuzz_summary, private_fake, start_full_gateway, unlimited_actor  # noqa: F401

TOKEN = "sgd_" + "e" * 64
DEADLINE_S = 8.0

PATHS = [
    "/v1/completions/anthropic-messages", "/v1/completions/anthropic", "/v1/completions/openai",
    "/v1/completions/fireworks", "/v1/completions/google", "/anthropic/v1/messages", "/openai/v1/chat/completions",
    "/v1/embeddings", "/v1/embeddings/models", "/openai/v1/embeddings", "/v1/limits", "/v1/limits/refresh",
    "/v1/attribution", "/-/__version", "/-/healthz", "/-/actor/sync-all-sources", "/-/flagged-requests",
    "/-/flagged-requests/prompt:a:b:c", "/metrics", "/openapi.json", "/", "/v1", "/-/nope",
]
TOKEN_CHARS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~", min_size=1, max_size=20)
VALUE_BYTES = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO", "get", "POST "]))
    path = draw(st.sampled_from(PATHS))
    suffix = draw(st.one_of(st.just(""), st.sampled_from(["?a=1", "/", "//", "/..", "%00", "%ff", "?x=%zz", "#f", "/%2e%2e/", "?" + "a" * 3000]), st.text(max_size=10).map(lambda t: t.replace(" ", "%20"))))
    target = (path + suffix).encode("utf-8", "surrogatepass")
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0", b"HTTP/1.1 "]))
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"gw")]
    auth = draw(st.sampled_from(["valid", "none", "garbage", "diag", "apikey"]))
    if auth == "valid":
        headers.append((b"Authorization", f"Bearer {TOKEN}".encode()))
    elif auth == "diag":
        headers.append((b"Authorization", f"Bearer {DIAGNOSTICS_SECRET}".encode()))
    elif auth == "apikey":
        headers.append((b"x-api-key", TOKEN.encode()))
    elif auth == "garbage":
        headers.append((b"Authorization", draw(VALUE_BYTES)))
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(TOKEN_CHARS.map(str.encode), st.sampled_from([b"X-Sourcegraph-Feature", b"X-Timeout-Ms", b"Content-Type", b"Expect", b"Transfer-Encoding", b"Accept", b"Content-Encoding", b"traceparent", b"X-Sourcegraph-Should-Trace"])))
        value = draw(st.one_of(VALUE_BYTES, st.sampled_from([b"chat_completions", b"code_completions", b"-1", b"0", b"1", b"99999999999999999999", b"1e3", b"chunked", b"gzip", b"100-continue", b"application/json", b"00-" + b"f" * 32 + b"-" + b"f" * 16 + b"-01"])))
        headers.append((name, value))
    body = draw(st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b"", b"{}", b"[]", b"null", b'{"model":"claude-3-haiku-20240307","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}', b'{"messages":' * 200, b"\xff\xfe"]),
    ))
    framing = draw(st.sampled_from(["length", "wrong-length", "chunked", "bad-chunked", "none", "negative"]))
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
        payload = body
    elif framing == "wrong-length":
        headers.append((b"Content-Length", str(len(body) + draw(st.integers(1, 50))).encode()))
        payload = body  # the server waits for bytes that never come: the body timeout must end it
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    elif framing == "bad-chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        payload = b"zz\r\n" + body + b"\r\n0\r\n\r\n"
    elif framing == "negative":
        headers.append((b"Content-Length", b"-5"))
        payload = body
    else:
        payload = b""
    headers.append((b"Connection", b"close"))
    head = method.encode() + b" " + target + b" " + version + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + payload


def exchange(port: int, raw: bytes) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            pass  # the server may close early (e.g. on an oversized header block)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks), time.monotonic() - started


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1"):
        # "100 (Continue)" for an Expect: 100-continue request; the real answer follows.
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    return status, headers, body


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, private_fake: Any) -> Iterator[Any]:
    workdir = tmp_path_factory.mktemp("http-fuzz")
    env = full_env(
        workdir,
        private_fake.base_url,
        CODY_GATEWAY_SERVER_BODY_TIMEOUT_S="0.3",
        CODY_GATEWAY_SERVER_IDLE_CONNECTION_TIMEOUT_S="1",
        CODY_GATEWAY_SERVER_MAX_HEADER_BYTES="8192",
        CODY_GATEWAY_SERVER_MAX_BODY_BYTES="65536",
    )
    gw = start_full_gateway(workdir, env, [unlimited_actor("raw-fuzzer", TOKEN)], name="raw http gateway")
    yield gw
    gw.stop()


@pytest.mark.timeout(180)
def test_raw_requests_never_crash_hang_or_5xx(gateway: Any) -> None:
    @settings(max_examples=examples(150), deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(raw=raw_requests())
    @counted("raw http: requests")
    def run(raw: bytes) -> None:
        response, elapsed = exchange(gateway.port, raw)
        assert elapsed < DEADLINE_S, f"{elapsed:.1f}s for {raw[:200]!r}"
        if not response:
            return  # closed without an answer: a protocol-level rejection or a body timeout
        status, headers, body = parse(response)
        assert status < 500, (status, raw[:300], response[:500])
        if "x-trace" not in headers:
            # Rejected by Tornado's HTTP layer before routing: the bare 400.
            assert status == 400 and body == b"", (raw[:300], response[:500])
            return
        if status >= 400 and not raw.startswith(b"HEAD"):
            assert headers.get("content-type", "").startswith("application/json"), (raw[:300], response[:500])
            payload = json.loads(body)
            path = raw.split(b" ", 2)[1].decode("latin-1") if raw.count(b" ") >= 2 else "/"
            assert error_message(payload, path), payload

    run()
    # Still serving, and nothing unhandled in the log.
    response, _ = exchange(gateway.port, b"GET /-/__version HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert parse(response)[0] == 200
    assert_clean_log(gateway)
