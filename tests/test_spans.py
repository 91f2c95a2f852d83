"""LeanSpan / LeanTracer: what span processors and exporters see is what the SDK's spans give them."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SynchronousMultiSpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from fakes.otlp import decode
from telemetry.otlp_export import encode_json, encode_protobuf
from telemetry.spans import LeanSpan, LeanTracer

pytestmark = pytest.mark.timeout(30)

REMOTE = SpanContext(
    trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id=0x00F067AA0BA902B7, is_remote=True,
    trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "value")]),
)  # fmt: skip


def _tracer() -> tuple[LeanTracer, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    processors = SynchronousMultiSpanProcessor()
    processors.add_span_processor(SimpleSpanProcessor(memory))
    return LeanTracer(Resource.create({"service.name": "cody-gateway"}), processors, "gateway"), memory


def test_a_request_tree_is_recorded_and_encodes_the_same_in_json_and_protobuf() -> None:
    tracer, memory = _tracer()
    attributes: dict[str, Any] = {"text": "héllo", "count": 2**40, "flag": True, "ratio": 0.25, "names": ["a", "b"]}
    server = tracer.start_span("server", REMOTE, kind=SpanKind.SERVER, attributes=attributes)
    server.add_event("retry", {"attempt": 2})
    client = tracer.start_span("chat model", server.get_span_context(), kind=SpanKind.CLIENT, start_time=1_000, attributes={"k": 1})
    client.set_status(Status(StatusCode.ERROR, "UpstreamError"))
    client.end(end_time=2_000)
    server.set_attribute("http.response.status_code", 200)
    server.end()
    spans = list(memory.get_finished_spans())
    assert [s.name for s in spans] == ["chat model", "server"]
    assert all(isinstance(s, ReadableSpan) for s in spans)
    inner, outer = spans
    assert outer.parent == REMOTE and outer.context.trace_id == REMOTE.trace_id
    assert outer.context.trace_state == REMOTE.trace_state and outer.context.trace_flags.sampled
    assert inner.parent == outer.context and (inner.start_time, inner.end_time) == (1_000, 2_000)
    assert dict(outer.attributes or {})["http.response.status_code"] == 200
    assert inner.status.status_code is StatusCode.ERROR

    from_json = decode(encode_json(spans), "application/json")
    from_protobuf = decode(encode_protobuf(spans), "application/x-protobuf")
    for decoded in from_json.resource_spans[0].scope_spans[0].spans:
        decoded.flags &= ~0xFF  # the W3C flags, which the SDK's protobuf encoder leaves out
    assert from_json == from_protobuf


def test_an_unsampled_parent_gives_a_non_recording_span_in_the_same_trace() -> None:
    tracer, memory = _tracer()
    unsampled = SpanContext(REMOTE.trace_id, REMOTE.span_id, is_remote=True, trace_flags=TraceFlags(0))
    span = tracer.start_span("server", unsampled, kind=SpanKind.SERVER)
    assert not span.is_recording()
    assert span.get_span_context().trace_id == REMOTE.trace_id and span.get_span_context().span_id != REMOTE.span_id
    span.end()
    assert memory.get_finished_spans() == ()


def test_a_span_ends_once_and_is_frozen_afterwards() -> None:
    tracer, memory = _tracer()
    span = tracer.start_span("work", None, attributes={"a": 1})
    assert isinstance(span, LeanSpan) and span.is_recording()
    span.set_status(StatusCode.OK)
    span.set_status(StatusCode.ERROR)  # OK is final, as in the SDK
    span.end()
    span.set_attribute("late", True)
    span.update_name("renamed")
    span.end()
    (finished,) = memory.get_finished_spans()
    assert finished.name == "work" and dict(finished.attributes or {}) == {"a": 1}
    assert finished.status.status_code is StatusCode.OK


def test_record_exception_keeps_the_type_and_not_the_message() -> None:
    tracer, memory = _tracer()
    with tracer.start_span("work", None) as span:
        span.record_exception(ValueError("the prompt said: secret"))
    (finished,) = memory.get_finished_spans()
    (event,) = finished.events
    assert event.name == "exception" and dict(event.attributes or {})["exception.type"] == "ValueError"
    assert "secret" not in repr(dict(event.attributes or {}))
