"""OpenTelemetry tracing: one server span per request, W3C traceparent honoured.

Every response gets ``X-Trace`` and ``X-Trace-Span`` (the reference's names)
and ``X-Span`` (the runbook's alias). With trace policy ``none`` (or
``selective`` without ``X-Sourcegraph-Should-Trace``) spans are not recorded,
but ids are still minted so responses, logs and events stay correlatable.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from conf.model import TelemetryConfig

SERVICE_NAME = "cody-gateway"
_PROPAGATOR = TraceContextTextMapPropagator()
_TRUTHY = frozenset({"1", "true", "yes"})


class Tracing:
    def __init__(
        self,
        config: TelemetryConfig,
        *,
        version: str,
        extra_processors: list[SpanProcessor] | None = None,
    ) -> None:
        self.policy = config.trace_policy
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": SERVICE_NAME, "service.version": version})
        )
        if config.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = config.otlp_endpoint.rstrip("/")
            if not endpoint.endswith("/v1/traces"):
                endpoint += "/v1/traces"
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        for processor in extra_processors or []:
            self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("gateway")
        self._rand = random.Random()

    def should_record(self, headers: Mapping[str, str]) -> bool:
        if self.policy == "all":
            return True
        if self.policy == "selective":
            return headers.get("X-Sourcegraph-Should-Trace", "").lower() in _TRUTHY
        return False

    def start_request_span(self, name: str, headers: Mapping[str, str], attributes: dict[str, Any]) -> Span:
        parent = _PROPAGATOR.extract(carrier=headers) if "traceparent" in headers else None
        if self.should_record(headers):
            return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        parent_ctx = trace.get_current_span(parent).get_span_context() if parent is not None else None
        trace_id = parent_ctx.trace_id if parent_ctx is not None and parent_ctx.is_valid else self._rand.getrandbits(128)
        return NonRecordingSpan(
            SpanContext(
                trace_id=trace_id or 1,
                span_id=self._rand.getrandbits(64) or 1,
                is_remote=False,
                trace_flags=TraceFlags(0),
            )
        )

    def start_child(self, name: str, parent: Span, attributes: dict[str, Any] | None = None) -> Span:
        if not parent.is_recording():
            return trace.INVALID_SPAN
        return self.tracer.start_span(name, context=trace.set_span_in_context(parent), attributes=attributes)

    def shutdown(self) -> None:
        self.provider.shutdown()


def span_ids(span: Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
