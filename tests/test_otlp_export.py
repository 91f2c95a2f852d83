"""The loop OTLP exporter: JSON that collectors decode to the same spans as protobuf, batching,
retries, a bounded queue when the collector is down, headers and gzip, flushing from other threads."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, set_span_in_context
from opentelemetry.trace.span import NonRecordingSpan, TraceState

from fakes.otlp import OtlpReceiver, decode
from telemetry.otlp_export import LoopSpanExporter, encode_json, encode_protobuf, parse_headers

pytestmark = pytest.mark.timeout(30)


def _varied_spans() -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "cody-gateway", "service.version": "t"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("gateway", "1.2")
    remote_parent = NonRecordingSpan(
        SpanContext(
            trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
            span_id=0x00F067AA0BA902B7,
            is_remote=True,
            trace_flags=TraceFlags(1),
            trace_state=TraceState([("vendor", "value")]),
        )
    )
    attributes: dict[str, Any] = {
        "text": "héllo", "count": 2**40, "negative": -3, "flag": True, "ratio": 0.25,
        "names": ["a", "b"], "numbers": [1, 2], "flags": [True, False],
    }
    with tracer.start_as_current_span(
        "server", context=set_span_in_context(remote_parent), kind=SpanKind.SERVER, attributes=attributes
    ) as server:
        server.add_event("retry", {"attempt": 2})
        with tracer.start_as_current_span("chat model", kind=SpanKind.CLIENT, links=[Link(remote_parent.get_span_context(), {"why": "x"})]) as client:
            client.set_status(Status(StatusCode.ERROR, "UpstreamError"))
        with tracer.start_as_current_span("ok"):
            pass
    provider.shutdown()
    return list(memory.get_finished_spans())


def test_json_decodes_to_exactly_what_protobuf_encodes() -> None:
    spans = _varied_spans()
    from_json = decode(encode_json(spans), "application/json")
    from_protobuf = decode(encode_protobuf(spans), "application/x-protobuf")
    decoded = [s for rs in from_json.resource_spans for ss in rs.scope_spans for s in ss.spans]
    # OTLP's flags carry the W3C trace flags in the low byte; the SDK's protobuf encoder leaves them out.
    assert {s.flags & 0xFF for s in decoded} == {1}
    for span in decoded:
        span.flags &= ~0xFF
        for link in span.links:
            link.flags &= ~0xFF
    assert from_json == from_protobuf
    assert [s.name for s in decoded] == ["chat model", "ok", "server"]
    server = decoded[2]
    assert server.kind == 2 and server.parent_span_id == bytes.fromhex("00f067aa0ba902b7")
    assert server.flags & 0x300 == 0x300  # remote parent known and remote
    assert server.trace_state == "vendor=value"
    assert decoded[0].status.code == 2


def test_parse_headers() -> None:
    assert parse_headers("") == {}
    assert parse_headers("api-key=a%3Db, x-team = infra ,broken") == {"api-key": "a=b", "x-team": "infra"}


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _provider_with(exporter: LoopSpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(exporter)
    return provider


def test_full_batches_post_at_once_and_partial_ones_after_the_delay() -> None:
    receiver = OtlpReceiver()

    async def main() -> None:
        exporter = LoopSpanExporter(receiver.url + "/v1/traces", batch_size=10, delay_s=0.3)
        tracer = _provider_with(exporter).get_tracer("t")
        for i in range(25):
            tracer.start_span(f"s{i}").end()
        await _until(lambda: len(receiver.posts) == 2, "two full batches")
        assert len(receiver.spans()) == 20  # the 5 left wait for the timer, not for more spans
        await _until(lambda: len(receiver.spans()) == 25, "the partial batch")
        assert sorted(s.name for s in receiver.spans()) == sorted(f"s{i}" for i in range(25))
        assert exporter.stats.exported == 25 and exporter.stats.dropped == 0
        await exporter.aclose()

    try:
        _run(main)
    finally:
        receiver.stop()


def test_transient_failures_are_retried_and_headers_and_gzip_are_sent() -> None:
    receiver = OtlpReceiver(statuses=[503, 502])

    async def main() -> None:
        exporter = LoopSpanExporter(
            receiver.url + "/v1/traces", batch_size=3, headers={"x-api-key": "k"}, compression="gzip", timeout_s=10
        )
        tracer = _provider_with(exporter).get_tracer("t")
        for i in range(3):
            tracer.start_span(f"s{i}").end()
        await _until(lambda: exporter.stats.exported == 3, "the export after two failures")
        assert exporter.stats.retries == 2 and exporter.stats.failed == 0
        headers, _ = receiver.posts[0]
        assert headers["x-api-key"] == "k" and headers["content-encoding"] == "gzip"
        assert len(receiver.spans()) == 3
        await exporter.aclose()

    try:
        _run(main)
    finally:
        receiver.stop()


def test_client_errors_are_not_retried() -> None:
    receiver = OtlpReceiver(statuses=[400])

    async def main() -> None:
        exporter = LoopSpanExporter(receiver.url + "/v1/traces", batch_size=2)
        tracer = _provider_with(exporter).get_tracer("t")
        tracer.start_span("a").end()
        tracer.start_span("b").end()
        await _until(lambda: exporter.stats.failed == 2, "the refused batch counted")
        assert exporter.stats.retries == 0 and receiver.posts == []
        await exporter.aclose()

    try:
        _run(main)
    finally:
        receiver.stop()


def test_a_dead_collector_bounds_the_queue_and_nothing_hangs() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1/traces"

    async def main() -> None:
        exporter = LoopSpanExporter(dead_url, batch_size=10, queue_size=50, timeout_s=1.0)
        tracer = _provider_with(exporter).get_tracer("t")
        for i in range(500):
            tracer.start_span(f"s{i}").end()
        assert exporter.stats.dropped >= 450
        await _until(lambda: exporter.stats.failed + exporter.stats.dropped == 500, "every span accounted for")
        assert exporter.stats.exported == 0
        started = asyncio.get_running_loop().time()
        await exporter.aclose(timeout_s=2.0)
        assert asyncio.get_running_loop().time() - started < 3.0

    _run(main)


def test_force_flush_from_another_thread_waits_for_the_post() -> None:
    receiver = OtlpReceiver()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)

        async def build() -> None:
            holder["exporter"] = LoopSpanExporter(receiver.url + "/v1/traces", batch_size=1000, delay_s=60)
            holder["provider"] = _provider_with(holder["exporter"])
            ready.set()

        loop.run_until_complete(build())
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        tracer = holder["provider"].get_tracer("t")
        # Ended off the loop: handed over to it.
        for i in range(5):
            tracer.start_span(f"s{i}").end()
        assert holder["provider"].force_flush(10_000)
        assert len(receiver.spans()) == 5  # the long delay would have kept them otherwise
        asyncio.run_coroutine_threadsafe(holder["exporter"].aclose(), loop).result(10)
        started = time.monotonic()
        assert holder["provider"].force_flush(10_000)  # closed: answers at once instead of waiting it out
        assert time.monotonic() - started < 1.0
    finally:
        asyncio.run_coroutine_threadsafe(holder["exporter"].aclose(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        receiver.stop()


def test_the_attribute_cache_is_bounded_and_keeps_types_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    import telemetry.otlp_export as otlp_export

    monkeypatch.setattr(otlp_export, "_ENCODED_MAX", 4)
    monkeypatch.setattr(otlp_export, "_ENCODED", {})
    encoded = [otlp_export._attribute("n", value) for value in (1, True, 1.0, "1", 1)]
    assert [e["value"] for e in encoded] == [
        {"intValue": "1"}, {"boolValue": True}, {"doubleValue": 1.0}, {"stringValue": "1"}, {"intValue": "1"},
    ]
    for value in range(100):
        assert otlp_export._attribute("count", value)["value"] == {"intValue": str(value)}
    assert len(otlp_export._ENCODED) <= 4
