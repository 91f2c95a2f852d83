"""Hardening of the upstream side (issue 17: items 1, 2, 5, 10, 11; issue 14 point 3).

* Outcomes are an Enum whose members are the strings they always were.
* Every deadline holds, whatever the client sends: no 0 ms curl timeout,
  and an IOLoop timer that ends the attempt even if curl does not.
* A client that leaves ends the upstream transfer at once, also while the
  upstream is silent (not at curl's next progress tick, ~1 s).
* Redirects are never followed or relayed; upstreams are asked for identity
  encoding, a compressed 2xx is refused, and bytes that are not SSE are a
  protocol error.
* The circuit breaker hears about the upstream's health only.

Transport tests run the real ``Transport`` over Tornado's curl client against
``fakes.hostile`` (a server in a thread of this process); gateway tests run
``gateway.py`` against it. Waits have deadlines; timings are asserted with
wide margins against what the old behaviour measured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pycurl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tornado.curl_httpclient import CurlAsyncHTTPClient, CurlError
from tornado.httputil import HTTPHeaders

from conf.loader import load_config
from fakes.hostile import HostileUpstream
from tests.test_fuzz_support import (
    examples,
    full_env,
    start_full_gateway,
    unlimited_actor,
)
from upstreams import transport as tp
from upstreams.base import UpstreamRequest
from upstreams.circuit import CircuitBreaker, health_signal
from upstreams.sse import NOT_SSE, SSEParser

pytestmark = pytest.mark.timeout(120)

CONFIG = load_config(None, environ={})
UPSTREAM = dataclasses.replace(CONFIG.upstream, stall_timeout_s=30)


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileUpstream]:
    server = HostileUpstream().start()
    yield server
    server.stop()


def request_to(hostile: HostileUpstream, *directives: str, stream: bool = True) -> tuple[str, UpstreamRequest]:
    name = uuid.uuid4().hex[:12]
    text = " ".join([f"hostile:id={name}", *directives])
    body = orjson.dumps({"model": "claude-3-haiku-20240307", "max_tokens": 10, "stream": stream,
                         "messages": [{"role": "user", "content": text}]})
    return name, UpstreamRequest(hostile.base_url + "/v1/messages", {"Content-Type": "application/json"}, body)


class Recorder:
    """What the caller of ``Transport.send`` is given."""

    def __init__(self) -> None:
        self.heads: list[int] = []
        self.chunks: list[bytes] = []
        self.on_first_chunk: Callable[[], None] | None = None

    def on_headers(self, status: int, headers: HTTPHeaders) -> None:
        self.heads.append(status)

    def on_chunk(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        if len(self.chunks) == 1 and self.on_first_chunk is not None:
            self.on_first_chunk()


def run_attempts(body: Callable[[tp.Transport, CurlAsyncHTTPClient], Any], *, max_clients: int = 4, config: Any = UPSTREAM) -> Any:
    """Run ``body(transport, client)`` on a fresh loop with a curl client of its own."""

    async def main() -> Any:
        client = CurlAsyncHTTPClient(force_instance=True, max_clients=max_clients)
        transport = tp.Transport(client, config)
        try:
            return await asyncio.wait_for(body(transport, client), 30)
        finally:
            if transport._sweeper is not None:
                transport._sweeper.stop()
            client.close()

    return asyncio.run(main())


def send(transport: tp.Transport, request: UpstreamRequest, timeout_s: float = 10.0,
         recorder: Recorder | None = None, abort: tp.AbortFlag | None = None) -> Any:
    recorder = recorder or Recorder()
    return transport.send(request, timeout_s=timeout_s, abort=abort or tp.AbortFlag(),
                          on_headers=recorder.on_headers, on_chunk=recorder.on_chunk)


# -- A. outcomes are an Enum ---------------------------------------------------------------


def test_outcomes_are_an_enum_of_the_old_strings() -> None:
    assert issubclass(tp.Outcome, enum.Enum)
    old = {"OK": "ok", "CLIENT_GONE": "client_gone", "CONNECT_ERROR": "connect_error", "TIMEOUT": "timeout",
           "STALL": "stall", "RESET": "reset", "ERROR": "error", "REJECTED": "rejected"}
    assert {member.name: member.value for member in tp.Outcome} == old
    for name, value in old.items():
        alias = getattr(tp, name)
        assert alias is tp.Outcome[name] and alias == value and hash(alias) == hash(value)
        # Logs, metric labels and events render exactly the old string.
        logged = logging.LogRecord("gateway", logging.INFO, __file__, 0, "%s", (alias,), None).getMessage()
        assert (str(alias), f"{alias}", logged, json.dumps(alias), orjson.dumps(alias)) == (
            value, value, value, f'"{value}"', f'"{value}"'.encode())
    assert tp.Attempt().outcome is tp.OK


# -- B. every deadline holds ---------------------------------------------------------------


@pytest.mark.parametrize("timeout_s", [0.0005, 0.001, 0.01])
def test_a_tiny_deadline_ends_a_slow_attempt_promptly(hostile: HostileUpstream, timeout_s: float) -> None:
    """Before: 0.0005 s became a 0 ms curl timeout ("none") and the 3 s upstream answered 200."""
    _, request = request_to(hostile, "hostile:delay=3")

    async def body(transport: tp.Transport, _: Any) -> tuple[tp.Attempt, float]:
        started = time.monotonic()
        attempt = await send(transport, request, timeout_s)
        return attempt, time.monotonic() - started

    attempt, elapsed = run_attempts(body)
    assert attempt.outcome == tp.TIMEOUT, (attempt, elapsed)
    assert attempt.status is None
    assert elapsed < 1.0, elapsed


def test_our_timer_ends_the_attempt_when_curls_does_not(hostile: HostileUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """curl's timeout switched off after the transport set it: the IOLoop backstop ends the attempt."""
    prepare = tp._Exchange.prepare

    def without_curl_timeout(self: Any, curl: pycurl.Curl) -> None:
        prepare(self, curl)
        curl.setopt(pycurl.TIMEOUT_MS, 0)

    monkeypatch.setattr(tp._Exchange, "prepare", without_curl_timeout)
    name, request = request_to(hostile, "hostile:delay=5")

    async def body(transport: tp.Transport, client: CurlAsyncHTTPClient) -> tuple[tp.Attempt, float, int]:
        started = time.monotonic()
        attempt = await send(transport, request, 0.2)
        return attempt, time.monotonic() - started, len(client._free_list)

    attempt, elapsed, free = run_attempts(body, max_clients=2)
    assert attempt.outcome == tp.TIMEOUT and attempt.status is None, attempt
    assert 0.15 < elapsed < 1.5, elapsed
    assert free == 2  # the handle went back to the pool
    hostile.wait_for(name, "disconnected", timeout=5)


def test_a_queued_attempt_still_ends_at_its_deadline(hostile: HostileUpstream) -> None:
    """With every curl handle busy the request waits in Tornado's queue, where curl's timeout
    has not started: the deadline still holds, and the queue still works afterwards."""
    _, busy = request_to(hostile, "hostile:delay=3")
    _, queued = request_to(hostile)
    _, later = request_to(hostile, stream=False)

    async def body(transport: tp.Transport, client: CurlAsyncHTTPClient) -> tuple[tp.Attempt, float, tp.Attempt, tp.Attempt]:
        first = asyncio.ensure_future(send(transport, busy, 1.5))
        await asyncio.sleep(0)
        started = time.monotonic()
        attempt = await send(transport, queued, 0.2)
        elapsed = time.monotonic() - started
        blocker = await first
        after = await send(transport, later, 5)
        return attempt, elapsed, blocker, after

    attempt, elapsed, blocker, after = run_attempts(body, max_clients=1)
    assert attempt.outcome == tp.TIMEOUT, attempt
    assert elapsed < 1.0, elapsed
    assert blocker.outcome == tp.TIMEOUT
    assert (after.outcome, after.status) == (tp.OK, 200)


def test_a_deadline_during_connect_is_a_timeout_not_a_connect_error() -> None:
    """A 1 ms deadline that runs out while connecting says "Connection timed out": it is still
    the deadline (a connect error would be retried and would count against the upstream)."""
    error = CurlError(pycurl.E_OPERATION_TIMEDOUT, "Connection timed out after 1 milliseconds")
    assert tp._classify(error, tp.Attempt(), connect_is_binding=False) == tp.TIMEOUT
    assert tp._classify(error, tp.Attempt(), connect_is_binding=True) == tp.CONNECT_ERROR


# -- C. a client that leaves ends the upstream transfer at once ------------------------------


def test_abort_while_the_upstream_is_silent_reaches_it_in_milliseconds(hostile: HostileUpstream) -> None:
    """Before: the abort waited for curl's next progress tick, ~1 s while the upstream is silent."""
    name, request = request_to(hostile, "hostile:silent=10")
    abort = tp.AbortFlag()
    recorder = Recorder()
    marks: dict[str, float] = {}

    def leave_soon() -> None:
        # The client leaves a little after the first event, while the upstream is silent.
        def leave() -> None:
            marks["abort"] = time.monotonic()
            abort.set()

        asyncio.get_running_loop().call_later(0.1, leave)

    recorder.on_first_chunk = leave_soon

    async def body(transport: tp.Transport, client: CurlAsyncHTTPClient) -> tuple[tp.Attempt, float, tp.Attempt, int]:
        attempt = await send(transport, request, 15, recorder, abort)
        returned = time.monotonic()
        # The handle was reset and reused correctly: the only handle serves the next attempt.
        _, again = request_to(hostile, stream=False)
        after = await send(transport, again, 5)
        return attempt, returned, after, len(client._free_list)

    attempt, returned, after, free = run_attempts(body, max_clients=1)
    seen = hostile.wait_for(name, "disconnected", timeout=5)
    assert attempt.outcome == tp.CLIENT_GONE and attempt.status == 200, attempt
    assert seen.disconnected_at is not None
    to_return, to_upstream = returned - marks["abort"], seen.disconnected_at - marks["abort"]
    print(f"abort -> send() returned {to_return * 1000:.1f} ms, upstream saw the disconnect {to_upstream * 1000:.1f} ms")
    assert to_return < 0.5 and to_upstream < 0.5, (to_return, to_upstream)
    assert seen.finished_at is None  # long before the silent upstream would have finished
    assert (after.outcome, after.status, free) == (tp.OK, 200, 1)


def test_a_rejection_mid_stream_ends_the_transfer_at_once(hostile: HostileUpstream) -> None:
    name, request = request_to(hostile, "hostile:silent=10")
    abort = tp.AbortFlag()
    recorder = Recorder()
    recorder.on_first_chunk = lambda: abort.reject("the gateway refused an event")

    async def body(transport: tp.Transport, _: Any) -> tuple[tp.Attempt, float]:
        started = time.monotonic()
        attempt = await send(transport, request, 15, recorder, abort)
        return attempt, time.monotonic() - started

    attempt, elapsed = run_attempts(body)
    assert (attempt.outcome, attempt.message) == (tp.REJECTED, "the gateway refused an event")
    assert elapsed < 1.0, elapsed
    hostile.wait_for(name, "disconnected", timeout=5)


def test_an_abort_before_the_attempt_sends_nothing(hostile: HostileUpstream) -> None:
    name, request = request_to(hostile)
    abort = tp.AbortFlag()
    abort.set()
    attempt = run_attempts(lambda transport, _: send(transport, request, 5, abort=abort))
    assert attempt.outcome == tp.CLIENT_GONE
    assert hostile.count(name) == 0


def test_the_stall_sweep_ends_a_silent_stream(hostile: HostileUpstream) -> None:
    name, request = request_to(hostile, "hostile:silent=10")
    config = dataclasses.replace(UPSTREAM, stall_timeout_s=1)

    async def body(transport: tp.Transport, _: Any) -> tuple[tp.Attempt, float]:
        started = time.monotonic()
        attempt = await send(transport, request, 15)
        return attempt, time.monotonic() - started

    attempt, elapsed = run_attempts(body, config=config)
    assert attempt.outcome == tp.STALL, attempt
    assert elapsed < 3.0, elapsed
    hostile.wait_for(name, "disconnected", timeout=5)


# -- D. redirects are never followed or relayed ------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_rejected_not_followed_nor_passed_on(hostile: HostileUpstream, status: int) -> None:
    name, request = request_to(hostile, f"hostile:redirect={status}")
    recorder = Recorder()
    attempt = run_attempts(lambda transport, _: send(transport, request, 5, recorder))
    assert attempt.outcome == tp.REJECTED, attempt
    assert f"redirect (HTTP {status})" in attempt.message and "attacker" not in attempt.message
    assert recorder.heads == [] and recorder.chunks == []  # the caller never saw the 3xx
    assert hostile.count(name) == 1


# -- E. identity encoding; compressed bodies and non-SSE bytes are refused ------------------------


def test_upstreams_are_asked_for_identity_encoding(hostile: HostileUpstream) -> None:
    name, request = request_to(hostile, stream=False)
    attempt = run_attempts(lambda transport, _: send(transport, request, 5))
    assert (attempt.outcome, attempt.status) == (tp.OK, 200)
    assert hostile.wait_for(name).headers.get("accept-encoding") == "identity"


def test_an_accept_encoding_set_by_the_provider_is_kept(hostile: HostileUpstream) -> None:
    name, request = request_to(hostile, stream=False)
    request = dataclasses.replace(request, headers={**request.headers, "accept-encoding": "br"})
    run_attempts(lambda transport, _: send(transport, request, 5))
    assert hostile.wait_for(name).headers.get("accept-encoding") == "br"


@pytest.mark.parametrize("stream", [True, False])
def test_a_compressed_2xx_is_rejected_before_any_byte_is_passed_on(hostile: HostileUpstream, stream: bool) -> None:
    _, request = request_to(hostile, "hostile:gzip=1", stream=stream)
    recorder = Recorder()
    attempt = run_attempts(lambda transport, _: send(transport, request, 5, recorder))
    assert attempt.outcome == tp.REJECTED, attempt
    assert "Content-Encoding: gzip" in attempt.message
    assert recorder.heads == [] and recorder.chunks == []


def events_of(chunks: list[bytes]) -> tuple[list[tuple[bytes, bytes]], SSEParser]:
    events: list[tuple[bytes, bytes]] = []
    parser = SSEParser(lambda name, data: events.append((name, data)))
    for chunk in chunks:
        parser.feed(chunk)
    parser.close()
    return events, parser


VALID_VARIANTS = {
    "anthropic": b'event: message_start\ndata: {"a":1}\n\nevent: ping\ndata: {"type": "ping"}\n\n',
    "openai": b'data: {"a":1}\n\ndata: [DONE]\n\n',
    "no space after the colon": b'data:{"a":1}\n\nevent:x\ndata:{}\n\n',
    "crlf (google)": b'data: {"a":1}\r\n\r\ndata: {"b":2}\r\n\r\n',
    "lone cr": b'data: {"a":1}\r\rdata: 2\r\r',
    "comments and keep-alives": b": OPENROUTER PROCESSING\n\n:\n\ndata: 1\n\n",
    "id and retry": b"retry: 3000\nid: 7\ndata: 1\n\nid\n\n",
    "a field name alone": b"data\n\nevent\ndata: x\n\n",
    "several data lines": b"data: a\ndata: b\n\n",
}


@pytest.mark.parametrize("name", list(VALID_VARIANTS))
def test_valid_sse_variants_are_not_a_protocol_error(name: str) -> None:
    stream = VALID_VARIANTS[name]
    for chunks in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        events, parser = events_of(chunks)
        assert events and parser.protocol_error is None and parser.not_sse == 0, (name, events)


@pytest.mark.parametrize(
    "junk",
    [
        b"<html><body>502 Bad Gateway</body></html>\n",
        b'{"error": "not an event stream"}\n',
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00",  # gzip, no line end at all
        b"Data: x\n",  # field names are case-sensitive
        b"hello world\n\n",
    ],
)
def test_bytes_that_are_not_sse_are_a_protocol_error_at_once(junk: bytes) -> None:
    events, parser = events_of([b"data: 1\n\n", junk])
    assert events[0] == (b"", b"1")
    assert parser.protocol_error == NOT_SSE


def test_not_sse_is_seen_on_the_first_chunk_of_a_line_that_never_ends() -> None:
    parser = SSEParser(lambda name, data: None)
    parser.feed(b"data: 1\n\n")
    assert parser.protocol_error is None
    parser.feed(b"\x1f\x8b" + b"\x00" * 100)  # a compressed body: no line end for megabytes
    assert parser.protocol_error == NOT_SSE


def test_an_oversized_event_is_a_protocol_error_too() -> None:
    parser = SSEParser(lambda name, data: None, max_event_bytes=8)
    parser.feed(b"data: 0123456789\n\n")
    assert parser.oversized == 1 and parser.protocol_error is not None and parser.protocol_error != NOT_SSE


_VALUE = st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
_EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])
_VALID_LINE = st.one_of(
    st.tuples(st.sampled_from([b"data", b"event", b"id", b"retry"]), st.sampled_from([b"", b":", b": ", b":  "]), _VALUE, _EOL)
    .map(lambda t: t[0] + (t[1] + t[2] if t[1] else b"") + t[3]),
    st.tuples(_VALUE, _EOL).map(lambda t: b":" + t[0] + t[1]),
    _EOL,
)
_CUTS = st.lists(st.integers(min_value=0, max_value=4000), max_size=12)


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    out, last = [], 0
    for point in points:
        out.append(stream[last:point])
        last = point
    return [*out, stream[last:]]


@settings(max_examples=examples(300), deadline=None)
@given(lines=st.lists(_VALID_LINE, max_size=40), cuts=_CUTS)
def test_valid_sse_is_never_a_protocol_error_however_it_is_cut(lines: list[bytes], cuts: list[int]) -> None:
    _, parser = events_of(_split(b"".join(lines), cuts))
    assert parser.protocol_error is None


@settings(max_examples=examples(300), deadline=None)
@given(lines=st.lists(st.one_of(_VALID_LINE, st.binary(max_size=12)), max_size=30), cuts=_CUTS)
def test_whether_a_stream_is_sse_does_not_depend_on_how_it_is_cut(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(lines)
    _, whole = events_of([stream])
    _, cut = events_of(_split(stream, cuts))
    _, bytewise = events_of([stream[i : i + 1] for i in range(len(stream))])
    assert (whole.protocol_error is None) == (cut.protocol_error is None) == (bytewise.protocol_error is None)
    assert whole.not_sse == cut.not_sse == bytewise.not_sse


# -- F. the circuit breaker hears about the upstream only ---------------------------------------

STATUSES = [None, 100, 200, 201, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409, 413, 422, 429,
            451, 499, 500, 501, 502, 503, 504, 529, 599]


def expected_signal(outcome: tp.Outcome, status: int | None, deadline_is_clients: bool) -> bool | None:
    """The policy, stated once more as a table for the exhaustive check."""
    if outcome == tp.OK:
        if status is not None and 200 <= status < 300:
            return True
        if status is not None and 500 <= status < 600:
            return False
        return None  # 1xx/3xx/4xx (malformed request, our key, our quota) say nothing
    return {
        tp.TIMEOUT: None if deadline_is_clients else False,
        tp.CLIENT_GONE: None,
        tp.CONNECT_ERROR: False,
        tp.RESET: False,
        tp.STALL: False,
        tp.REJECTED: False,
        tp.ERROR: False,
    }[outcome]


def test_health_signal_exhaustively() -> None:
    seen = 0
    for outcome in tp.Outcome:
        for status in STATUSES:
            for deadline_is_clients in (False, True):
                got = health_signal(outcome, status, deadline_is_clients=deadline_is_clients)
                assert got is expected_signal(outcome, status, deadline_is_clients), (outcome, status, deadline_is_clients, got)
                seen += 1
    assert seen == len(tp.Outcome) * len(STATUSES) * 2


@pytest.mark.parametrize(
    ("outcome", "status", "clients", "expected"),
    [
        (tp.TIMEOUT, None, True, None),  # X-Timeout-Ms: 10
        (tp.TIMEOUT, None, False, False),  # the gateway's own deadline
        (tp.CLIENT_GONE, 200, False, None),  # disconnect, or a client too slow
        (tp.OK, 400, False, None),
        (tp.OK, 404, False, None),
        (tp.OK, 413, False, None),
        (tp.OK, 422, False, None),
        (tp.OK, 401, False, None),
        (tp.OK, 403, False, None),
        (tp.OK, 429, False, None),
        (tp.OK, 500, True, False),
        (tp.OK, 503, False, False),
        (tp.OK, 200, True, True),
        (tp.CONNECT_ERROR, None, True, False),
        (tp.RESET, 200, False, False),
        (tp.STALL, 200, True, False),
    ],
)
def test_health_signal_named_cases(outcome: tp.Outcome, status: int | None, clients: bool, expected: bool | None) -> None:
    assert health_signal(outcome, status, deadline_is_clients=clients) is expected


def test_client_deadlines_do_not_open_the_breaker_but_the_gateways_do() -> None:
    breaker = CircuitBreaker(CONFIG.upstream)
    for _ in range(96):
        breaker.record_attempt("anthropic/m", tp.TIMEOUT, None, deadline_is_clients=True)
        breaker.record_attempt("anthropic/m", tp.CLIENT_GONE, 200, deadline_is_clients=False)
        breaker.record_attempt("anthropic/m", tp.OK, 429, deadline_is_clients=False)
    assert breaker.available("anthropic/m")
    assert breaker.snapshot()["models"].get("anthropic/m", {"recent_attempts": 0})["recent_attempts"] == 0
    for _ in range(10):
        breaker.record_attempt("anthropic/m", tp.TIMEOUT, None, deadline_is_clients=False)
    assert not breaker.available("anthropic/m")


def test_record_takes_a_health_signal_and_still_a_bare_status() -> None:
    breaker = CircuitBreaker(dataclasses.replace(CONFIG.upstream, circuit_min_samples=2, circuit_failure_ratio=0.5))
    breaker.record("m", None)
    breaker.record("m", True)
    breaker.record("m", False)
    assert breaker._recent("m") == (2, 1) and not breaker.available("m")
    breaker.record("legacy", 200)
    breaker.record("legacy", 504)
    assert breaker._recent("legacy") == (2, 1)


# -- through the gateway ---------------------------------------------------------------------

TOKEN = "sgd_" + "7" * 64
OTHER = "sgd_" + "8" * 64
ROUTE = "/v1/completions/anthropic-messages"


def gateway_for(hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory, name: str, **extra: str) -> Any:
    workdir = tmp_path_factory.mktemp(name)
    env = full_env(workdir, hostile.base_url, CODY_GATEWAY_UPSTREAM_RETRY_MAX_ATTEMPTS="1", **extra)
    actors = [unlimited_actor("hardening-a", TOKEN), unlimited_actor("hardening-b", OTHER)]
    return start_full_gateway(workdir, env, actors, name=name)


@pytest.fixture(scope="module")
def gw(hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    gateway = gateway_for(hostile, tmp_path_factory, "hardening-gateway")
    yield gateway
    gateway.stop()


def body_with(text: str, stream: bool) -> dict[str, Any]:
    return {"model": "claude-3-haiku-20240307", "max_tokens": 50, "stream": stream, "messages": [{"role": "user", "content": text}]}


def headers_for(token: str = TOKEN, timeout_ms: int | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}", "X-Sourcegraph-Feature": "chat_completions"}
    if timeout_ms is not None:
        headers["X-Timeout-Ms"] = str(timeout_ms)
    return headers


def event_for(gw: Any, trace: str) -> dict[str, Any]:
    from fakes.processes import wait_until

    found = wait_until(lambda: [e for e in gw.events("CompletionsFinished") if e["metadata"].get("trace_id") == trace], 10, what="usage event")
    return found[0]["metadata"]


@pytest.mark.parametrize("status", [302, 307, 308])
def test_the_gateway_answers_a_redirect_with_a_502(gw: Any, hostile: HostileUpstream, status: int) -> None:
    name = uuid.uuid4().hex[:12]
    response = httpx.post(gw.base_url + ROUTE, json=body_with(f"hostile:id={name} hostile:redirect={status}", False),
                          headers=headers_for(), timeout=20)
    assert response.status_code == 502, (response.status_code, response.text)
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith("application/json")
    assert "redirect" in response.json()["error"] and "attacker" not in response.text
    assert hostile.count(name) == 1


def test_the_gateway_refuses_a_compressed_stream(gw: Any) -> None:
    response = httpx.post(gw.base_url + ROUTE, json=body_with("hostile:gzip=1", True), headers=headers_for(), timeout=20)
    assert response.status_code == 502, (response.status_code, response.content[:200])
    assert "content-encoding" not in response.headers
    assert event_for(gw, response.headers["x-trace"])["outcome"] in ("upstream_error", "error")


def test_the_gateway_ends_a_stream_that_turns_into_junk_in_band(gw: Any) -> None:
    with httpx.stream("POST", gw.base_url + ROUTE, json=body_with("hostile:junk=1", True), headers=headers_for(), timeout=20) as response:
        data = b"".join(response.iter_raw())
    assert b"<html>" not in data and b"\x1f\x8b" not in data
    outcome = event_for(gw, response.headers["x-trace"])["outcome"]
    if response.status_code == 200:
        # The first event was relayed: the stream ends with the provider-shaped error event.
        last = data.replace(b"\r\n", b"\n").rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert last.startswith(b"event: error") and b"not Server-Sent Events" in last, data[-300:]
        assert outcome == "upstream_error"
    else:
        # The junk came with the first event (one read): nothing was relayed.
        assert response.status_code == 502 and b"not Server-Sent Events" in data, (response.status_code, data[:300])
        assert outcome in ("upstream_error", "error")


def test_the_gateway_holds_a_1_ms_deadline(gw: Any) -> None:
    started = time.monotonic()
    response = httpx.post(gw.base_url + ROUTE, json=body_with("hostile:delay=3", False), headers=headers_for(timeout_ms=1), timeout=20)
    elapsed = time.monotonic() - started
    assert response.status_code == 504, (response.status_code, response.text)
    assert elapsed < 1.5, elapsed


def test_a_client_that_leaves_a_silent_stream_frees_the_upstream_at_once(gw: Any, hostile: HostileUpstream) -> None:
    name = uuid.uuid4().hex[:12]
    with httpx.stream("POST", gw.base_url + ROUTE, json=body_with(f"hostile:id={name} hostile:silent=20", True),
                      headers=headers_for(), timeout=20) as response:
        assert response.status_code == 200
        next(response.iter_raw())  # the first event; then the upstream goes silent
        hostile.wait_for(name)
        left = time.monotonic()
    seen = hostile.wait_for(name, "disconnected", timeout=10)
    assert seen.disconnected_at is not None
    delay = seen.disconnected_at - left
    print(f"client left -> upstream saw the disconnect {delay * 1000:.1f} ms")
    assert delay < 0.5, delay
    assert event_for(gw, response.headers["x-trace"])["outcome"] == "client_disconnected"


def test_one_actors_short_deadlines_do_not_take_the_model_from_others(hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Issue 17 item 1: 96 requests with X-Timeout-Ms: 10 against a slow upstream opened the circuit."""
    gateway = gateway_for(hostile, tmp_path_factory, "hardening-breaker")
    try:
        with httpx.Client(timeout=20) as client:
            for _ in range(96):
                response = client.post(gateway.base_url + ROUTE, json=body_with("hostile:delay=3", False), headers=headers_for(timeout_ms=10))
                assert response.status_code == 504, (response.status_code, response.text)
            other = [client.post(gateway.base_url + ROUTE, json=body_with("hello", False), headers=headers_for(OTHER)).status_code
                     for _ in range(5)]
        assert other == [200] * 5, other
    finally:
        gateway.stop()
