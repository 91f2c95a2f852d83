"""Upstream responses are hostile input too.

The fake provider is told (``fake:<name>=<value>`` in the prompt) to answer
with malformed JSON, the wrong content type, invalid UTF-8, an oversized
event, a cut-off body or a stream that never ends. Whatever it does, the
client must end up with a clear error (a JSON 502/504 before any byte was
sent, or the provider-shaped in-band error event as the last thing in a
stream), exactly one usage event must be recorded with a failure outcome,
and nothing may hang.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakes.processes import wait_until
from tests.test_fuzz_schemathesis import assert_clean_log
from tests.test_fuzz_support import full_env, private_fake, start_full_gateway, unlimited_actor  # noqa: F401

TOKEN = "sgd_" + "9" * 64
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Sourcegraph-Feature": "chat_completions"}
FAILED_OUTCOMES = {"upstream_error", "error"}


def body_for(route: str, text: str, stream: bool) -> dict[str, Any]:
    if route == "/v1/completions/anthropic-messages":
        return {"model": "claude-3-haiku-20240307", "max_tokens": 50, "stream": stream, "messages": [{"role": "user", "content": text}]}
    if route == "/v1/completions/anthropic":
        return {"model": "claude-instant-1.2", "max_tokens_to_sample": 50, "stream": stream, "prompt": f"\n\nHuman: {text}\n\nAssistant:"}
    if route == "/v1/completions/openai":
        return {"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": text}]}
    if route == "/v1/completions/fireworks":
        return {"model": "starcoder", "stream": stream, "messages": [{"role": "user", "content": text}], "max_tokens": 50}
    assert route == "/v1/completions/google"
    return {"model": "gemini-1.5-flash-latest", "stream": stream, "contents": [{"role": "user", "parts": [{"text": text}]}]}


ROUTES = ["/v1/completions/anthropic-messages", "/v1/completions/anthropic", "/v1/completions/openai", "/v1/completions/fireworks", "/v1/completions/google"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, private_fake: Any) -> Iterator[Any]:
    workdir = tmp_path_factory.mktemp("hostile-upstream")
    env = full_env(workdir, private_fake.base_url, CODY_GATEWAY_UPSTREAM_RETRY_MAX_ATTEMPTS="1", CODY_GATEWAY_UPSTREAM_STALL_TIMEOUT_S="1")
    gateway = start_full_gateway(workdir, env, [unlimited_actor("hostile-upstream", TOKEN)], name="hostile upstream gateway")
    yield gateway
    gateway.stop()


def call(gw: Any, route: str, directives: str, stream: bool, timeout_ms: int = 3000) -> tuple[httpx.Response, bytes, float]:
    started = time.monotonic()
    headers = {**AUTH, "X-Timeout-Ms": str(timeout_ms)}
    with httpx.stream("POST", gw.base_url + route, json=body_for(route, "hi " + directives, stream), headers=headers, timeout=20) as response:
        data = b"".join(response.iter_raw())
    return response, data, time.monotonic() - started


SEEN_TRACES: list[str] = []


def one_event(gw: Any, trace: str) -> dict[str, Any]:
    """The request's usage event; duplicates are checked once for all at the end of the module."""
    found = wait_until(lambda: [e for e in gw.events("CompletionsFinished") if e["metadata"].get("trace_id") == trace], 10, what="usage event")
    SEEN_TRACES.append(trace)
    return found[0]["metadata"]


def assert_clear_failure(gw: Any, response: httpx.Response, data: bytes, elapsed: float) -> None:
    assert elapsed < 10, f"took {elapsed:.1f}s"
    trace = response.headers["x-trace"]
    if response.status_code >= 400:
        assert response.status_code in (502, 503, 504), (response.status_code, data[:300])
        assert response.headers["content-type"].startswith("application/json")
        assert set(json.loads(data)) == {"error"}
    else:
        # A stream that had started: the provider-shaped error event is the last thing sent.
        assert response.headers["content-type"].startswith("text/event-stream"), (response.headers, data[:200])
        last = data.replace(b"\r\n", b"\n").rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert b"error" in last and last.startswith((b"event: error", b"data: {\"error\"")), data[-400:]
    metadata = one_event(gw, trace)
    assert metadata["outcome"] in FAILED_OUTCOMES, metadata


# (directives, stream) that each route must turn into a clear failure.
CASES = {
    "malformed json body": ("fake:malformed=1", False),
    "malformed stream event": ("fake:malformed=1", True),
    "wrong content type (json)": ("fake:content_type=text/html", False),
    "wrong content type (stream)": ("fake:content_type=application/json", True),
    "invalid utf-8 body": ("fake:invalid_utf8=1", False),
    "invalid utf-8 event": ("fake:invalid_utf8=1", True),
    "body cut off": ("fake:disconnect_after=2", False),
    "stream cut off": ("fake:disconnect_after=2", True),
    "stream stalls": ("fake:stall_after=1", True),
    "endless stream": ("fake:tokens=1000000 fake:tokens_per_s=100", True),
}

def params() -> list[Any]:
    out = []
    for case in CASES:
        for route in ROUTES:
            if case == "stream stalls" and route not in ("/v1/completions/anthropic-messages", "/v1/completions/google"):
                continue  # each stall costs the stall timeout; two framings (LF and CRLF) are enough
            out.append(pytest.param(case, route, id=f"{case}-{route.rsplit('/', 1)[-1]}"))
    return out


@pytest.mark.parametrize(("case", "route"), params())
def test_hostile_upstream_ends_in_a_clear_error_and_one_event(gw: Any, case: str, route: str) -> None:
    directives, stream = CASES[case]
    response, data, elapsed = call(gw, route, directives, stream, timeout_ms=600 if case == "endless stream" else 3000)
    assert_clear_failure(gw, response, data, elapsed)


@pytest.mark.parametrize("route", ["/v1/completions/anthropic-messages", "/v1/completions/openai"])
def test_an_oversized_event_ends_the_stream(gw: Any, route: str) -> None:
    """One 11 MB event (the SSE parser holds at most 10 MB of one event)."""
    response, data, elapsed = call(gw, route, "fake:huge_event_bytes=11000000", True)
    assert_clear_failure(gw, response, data, elapsed)


def test_upstream_cookies_and_server_identity_are_not_relayed(gw: Any, private_fake: Any) -> None:
    response, _, _ = call(gw, "/v1/completions/anthropic-messages", "", False)
    assert response.status_code == 200
    assert "set-cookie" not in response.headers
    assert response.headers.get("server", "").lower() != "cloudflare"


def test_exactly_one_event_per_request_and_a_clean_log(gw: Any) -> None:
    assert SEEN_TRACES
    time.sleep(0.2)  # let a late duplicate reach the file
    per_trace: dict[str, int] = {}
    for event in gw.events("CompletionsFinished"):
        trace = event["metadata"].get("trace_id")
        per_trace[trace] = per_trace.get(trace, 0) + 1
    assert {t: n for t, n in per_trace.items() if n != 1 and t in SEEN_TRACES} == {}
    assert_clean_log(gw)
