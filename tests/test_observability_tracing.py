"""Tracing through the real server: span tree and attributes, trace headers, policy, OTLP export,
and the trace id in the usage event and the log lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from fakes.otlp import OtlpReceiver
from fakes.processes import wait_until
from telemetry.logs import JsonFormatter
from tests.conftest import TOKEN_A, TOKEN_B, actor, limits
from tests.support.observed_fixtures import observed_gateway  # noqa: F401  (fixture)
from tests.support.observed_gateway import InProcessGateway

MODEL = "claude-3-haiku-20240307"
ROUTE = "/v1/completions/anthropic-messages"
SERVER_SPAN = f"v1.completions.anthropicmessages.POST {ROUTE}"
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"
ACTORS = [actor("actor-a", TOKEN_A), actor("actor-b", TOKEN_B, chat_completions=limits(limit=1, interval="1h"))]


def post(gw: InProcessGateway, text: str, *, token: str = TOKEN_A, stream: bool = False, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 50, "stream": stream, "messages": [{"role": "user", "content": text}]}
    response = httpx.post(
        gw.base_url + ROUTE,
        content=json.dumps(body),
        headers={
            "Authorization": f"Bearer {token}",
            "X-Sourcegraph-Feature": "chat_completions",
            "Content-Type": "application/json",
            **(headers or {}),
        },
        timeout=30,
    )
    gw.settle()
    return response


def spans_of(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]


def by_name(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def gw(observed_gateway: Callable[..., InProcessGateway], exporter: InMemorySpanExporter) -> InProcessGateway:
    return observed_gateway(ACTORS, span_processors=[SimpleSpanProcessor(exporter)])


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """JSON log lines of the gateway's loggers, as the formatter writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("gateway")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_incoming_traceparent_is_the_parent_and_headers_name_the_server_span(gw: InProcessGateway, exporter: InMemorySpanExporter) -> None:
    response = post(gw, "hello fake:tokens=7", headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200
    assert response.headers["X-Trace"] == INCOMING_TRACE
    assert response.headers["X-Trace-Span"] == response.headers["X-Span"]
    spans = spans_of(exporter, INCOMING_TRACE)
    server = by_name(spans, SERVER_SPAN)
    assert server.kind == SpanKind.SERVER
    assert server.parent is not None and format(server.parent.span_id, "016x") == INCOMING_PARENT
    assert format(server.context.span_id, "016x") == response.headers["X-Trace-Span"]


def test_span_tree_carries_the_reference_and_genai_attributes(gw: InProcessGateway, exporter: InMemorySpanExporter) -> None:
    response = post(gw, "hello fake:tokens=7", stream=True)
    assert response.status_code == 200
    trace_id = response.headers["X-Trace"]
    spans = spans_of(exporter, trace_id)
    server = by_name(spans, SERVER_SPAN)
    attrs: dict[str, Any] = dict(server.attributes or {})
    assert attrs["sampling.retain"] is True
    assert attrs["actor.id"] == "actor-a" and attrs["actor.source"] == "static"
    assert attrs["upstreamStatusCode"] == 200 and attrs["resolvedStatusCode"] == 200
    assert attrs["http.response.status_code"] == 200
    assert attrs["gen_ai.system"] == "anthropic"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.usage.output_tokens"] == 7
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["model"] == f"anthropic/{MODEL}" and attrs["feature"] == "chat_completions"

    upstream = by_name(spans, f"chat {MODEL}")
    assert upstream.kind == SpanKind.CLIENT
    assert upstream.parent is not None and upstream.parent.span_id == server.context.span_id
    up: dict[str, Any] = dict(upstream.attributes or {})
    assert up["gen_ai.usage.output_tokens"] == 7 and up["gen_ai.request.max_tokens"] == 50
    assert up["gen_ai.request.stream"] is True and up["http.response.status_code"] == 200
    assert server.start_time is not None and server.end_time is not None
    assert upstream.start_time is not None and upstream.end_time is not None
    assert server.start_time <= upstream.start_time <= upstream.end_time <= server.end_time
    # Nothing prompt-bearing in any attribute.
    for span in spans:
        assert "hello" not in json.dumps(dict(span.attributes or {}), default=str)


def test_upstream_attempts_are_child_spans_only_when_retried(gw: InProcessGateway, exporter: InMemorySpanExporter) -> None:
    single = post(gw, "hello fake:tokens=2")
    assert single.status_code == 200
    spans = spans_of(exporter, single.headers["X-Trace"])
    upstream = by_name(spans, f"chat {MODEL}")
    assert dict(upstream.attributes or {})["upstream.outcome"] == "ok"
    assert [s.name for s in spans if s.parent is not None and s.parent.span_id == upstream.context.span_id] == []

    retried = post(gw, "hello fake:tokens=2 fake:status=503 fake:fail_times=1 fake:fail_key=tracing-retry")
    assert retried.status_code == 200
    spans = spans_of(exporter, retried.headers["X-Trace"])
    upstream = by_name(spans, f"chat {MODEL}")
    attempts = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == upstream.context.span_id),
        key=lambda s: s.start_time or 0,
    )
    assert [s.name for s in attempts] == ["POST", "POST"]
    assert [dict(s.attributes or {}).get("http.response.status_code") for s in attempts] == [503, 200]
    assert "upstream.outcome" not in dict(upstream.attributes or {})


def test_wrapped_instrumentation_points_add_auth_limiter_and_event_spans(gw: InProcessGateway, exporter: InMemorySpanExporter) -> None:
    response = post(gw, "hello fake:tokens=3")
    spans = spans_of(exporter, response.headers["X-Trace"])
    server = by_name(spans, SERVER_SPAN)
    auth = by_name(spans, "Sources.Get")
    assert (auth.attributes or {})["matched_source"] == "static"
    limiter = by_name(spans, "actor.Limiter.TryAcquire")
    assert (limiter.attributes or {})["allowed"] is True and (limiter.attributes or {})["limit"] == 1000
    event = by_name(spans, "bufferedLogger.LogEvent")
    assert (event.attributes or {})["event.name"] == "CompletionsFinished"
    for child in (auth, limiter, event):
        assert child.parent is not None and child.parent.span_id == server.context.span_id


@pytest.mark.parametrize(
    ("policy", "should_trace", "recorded"),
    [("none", True, False), ("selective", False, False), ("selective", True, True), ("all", False, True)],
)
def test_trace_policy(observed_gateway: Callable[..., InProcessGateway], exporter: InMemorySpanExporter,
                      policy: str, should_trace: bool, recorded: bool) -> None:
    gw = observed_gateway(ACTORS, env={"CODY_GATEWAY_TRACE_POLICY": policy}, span_processors=[SimpleSpanProcessor(exporter)])
    headers = {"traceparent": TRACEPARENT}
    if should_trace:
        headers["X-Sourcegraph-Should-Trace"] = "true"
    response = post(gw, "hello", headers=headers)
    assert response.status_code == 200
    # Ids are minted and the incoming trace continues whatever the policy.
    assert response.headers["X-Trace"] == INCOMING_TRACE
    assert len(response.headers["X-Trace-Span"]) == 16
    assert bool(spans_of(exporter, INCOMING_TRACE)) is recorded


def test_trace_id_reaches_the_usage_event_and_the_log_lines(gw: InProcessGateway, captured_logs: io.StringIO) -> None:
    ok = post(gw, "hello fake:tokens=2")
    failed = post(gw, "SECRET-PROMPT-TEXT fake:status=500")
    assert ok.status_code == 200 and failed.status_code == 500
    events_file = Path(gw.config.events.file)

    def finished_events() -> list[dict[str, Any]]:
        if not events_file.exists():
            return []
        rows = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
        return [json.loads(r["metadata"]) for r in rows if r["name"] == "CompletionsFinished"]

    metadata = wait_until(lambda: (lambda rows: rows if len(rows) >= 2 else None)(finished_events()), what="two events")
    assert {m["trace_id"] for m in metadata} == {ok.headers["X-Trace"], failed.headers["X-Trace"]}

    def access_lines() -> list[dict[str, Any]]:
        return [line for line in log_lines(captured_logs) if line["logger"] == "gateway.access"]

    access = wait_until(lambda: (lambda found: found if len(found) == 2 else None)(access_lines()), what="2 access lines")
    lines = log_lines(captured_logs)
    first = next(line for line in access if line["trace_id"] == ok.headers["X-Trace"])
    assert first["span_id"] == ok.headers["X-Trace-Span"]
    assert first["method"] == "POST" and first["path"] == ROUTE and first["status"] == 200
    assert first["actor_id"] == "actor-a" and first["feature"] == "chat_completions"
    assert first["model"] == f"anthropic/{MODEL}" and first["output_tokens"] == 2
    assert first["duration_ms"] >= first["upstream_ms"] >= 0 and first["overhead_ms"] >= 0
    # A line logged while serving a request carries that request's ids.
    upstream_error = next(line for line in lines if "returned 500" in line["msg"])
    assert upstream_error["trace_id"] == failed.headers["X-Trace"]
    assert upstream_error["span_id"] == failed.headers["X-Trace-Span"]
    text = captured_logs.getvalue()
    assert "SECRET-PROMPT-TEXT" not in text and TOKEN_A not in text


@pytest.mark.parametrize("protocol", ["http/json", "http/protobuf"])
def test_spans_are_exported_over_otlp(observed_gateway: Callable[..., InProcessGateway], protocol: str) -> None:
    receiver = OtlpReceiver()
    try:
        gw = observed_gateway(
            ACTORS, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
        )
        response = post(gw, "hello fake:tokens=4")
        assert response.status_code == 200
        assert gw.tracing.force_flush()
        expected = "application/json" if protocol == "http/json" else "application/x-protobuf"
        assert {headers["content-type"] for headers, _ in receiver.posts} == {expected}
        trace_id = bytes.fromhex(response.headers["X-Trace"])
        spans = [s for s in receiver.spans() if s.trace_id == trace_id]
        names = {s.name for s in spans}
        assert {SERVER_SPAN, f"chat {MODEL}", "Sources.Get", "actor.Limiter.TryAcquire"} <= names
        server = next(s for s in spans if s.name == SERVER_SPAN)
        assert server.span_id == bytes.fromhex(response.headers["X-Trace-Span"])
        assert server.kind == 2  # SPAN_KIND_SERVER
        upstream = next(s for s in spans if s.name == f"chat {MODEL}")
        assert upstream.parent_span_id == server.span_id and upstream.kind == 3  # SPAN_KIND_CLIENT
        attributes = {a.key: a.value for a in upstream.attributes}
        assert attributes["gen_ai.request.model"].string_value == MODEL
        assert attributes["gen_ai.usage.output_tokens"].int_value == 4
        metrics = httpx.get(gw.base_url + "/metrics", timeout=10).text
        exported = [line for line in metrics.splitlines() if line.startswith('cody_gateway_trace_spans_total{outcome="exported"}')]
        assert exported and float(exported[0].split()[-1]) >= len(spans)
    finally:
        receiver.stop()


def test_without_an_exporter_spans_are_not_built_but_ids_are(observed_gateway: Callable[..., InProcessGateway]) -> None:
    gw = observed_gateway(ACTORS)
    assert not gw.tracing.exporting
    response = post(gw, "hello", headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200 and response.headers["X-Trace"] == INCOMING_TRACE
