"""OpenTelemetry tracing: one server span per request, W3C traceparent honoured.

Every response gets ``X-Trace`` and ``X-Trace-Span`` (the reference's names)
and ``X-Span`` (the runbook's alias). With trace policy ``none`` (or
``selective`` without ``X-Sourcegraph-Should-Trace``) spans are not recorded,
but ids are still minted so responses, logs and events stay correlatable.
Spans are also not recorded when nothing would receive them (no OTLP
endpoint and no extra processor): building spans nobody exports is pure cost.
Spans are telemetry/spans.py's LeanSpans (the API's Span and the SDK's
ReadableSpan, without the SDK Tracer's per-span validation and locks);
export is telemetry/otlp_export.py: OTLP/HTTP (JSON by default) posted from
the event loop, not the SDK's exporter thread.

The request span is made current in the request's own asyncio task, so log
lines and child spans created anywhere below the handler find it without
being handed it.

Child spans use the reference's names (``Sources.Get``,
``actor.Limiter.TryAcquire``, ``bufferedLogger.LogEvent``); the upstream call
is a CLIENT span named and attributed after the OpenTelemetry GenAI semantic
conventions (``chat claude-3-haiku``, ``gen_ai.system``, ``gen_ai.usage.*``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, SynchronousMultiSpanProcessor
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from conf.model import TelemetryConfig
from telemetry.otlp_export import LoopSpanExporter, parse_headers
from telemetry.spans import LeanTracer

SERVICE_NAME = "cody-gateway"
_PROPAGATOR = TraceContextTextMapPropagator()
_TRUTHY = frozenset({"1", "true", "yes"})

# Span names of the reference (section 8).
SPAN_AUTH = "Sources.Get"
SPAN_LIMITER = "actor.Limiter.TryAcquire"
SPAN_EVENT = "bufferedLogger.LogEvent"
SPAN_NOTIFY = "slackRateLimitNotification"

# gen_ai.system / gen_ai.provider.name per provider: the semantic conventions'
# well-known values where one exists, the provider's own name otherwise.
GENAI_SYSTEMS: Mapping[str, str] = {
    "anthropic": "anthropic",
    "openai": "openai",
    "fireworks": "fireworks",
    "google": "gemini",
    "sourcegraph": "sourcegraph",
}
# gen_ai.operation.name per route operation.
GENAI_OPERATIONS: Mapping[str, str] = {
    "v1.completions.anthropic": "text_completion",
    "v1.completions.anthropicmessages": "chat",
    "v1.completions.openai": "chat",
    "v1.completions.fireworks": "text_completion",
    "v1.completions.google": "generate_content",
    "v1.embeddings": "embeddings",
}


# The ids of the request being served in this task (its server span), for
# log lines and error reports made anywhere below the handler.
_REQUEST_IDS: ContextVar[tuple[str, str] | None] = ContextVar("gateway_request_ids", default=None)


class Tracing:
    def __init__(
        self,
        config: TelemetryConfig,
        *,
        version: str,
        extra_processors: list[SpanProcessor] | None = None,
    ) -> None:
        self.policy = config.trace_policy
        self.resource = Resource.create({"service.name": SERVICE_NAME, "service.version": version})
        # The processors every span goes to; LeanTracer reports to them directly.
        self.processors = SynchronousMultiSpanProcessor()
        exporting = False
        self.exporter: LoopSpanExporter | None = None
        if config.otlp_endpoint:
            self.exporter = LoopSpanExporter(
                otlp_traces_url(config.otlp_endpoint),
                protocol=config.otlp_protocol,
                headers=parse_headers(config.otlp_headers),
                compression=config.otlp_compression,
                timeout_s=config.otlp_timeout_ms / 1000,
                batch_size=config.otlp_batch_size,
                queue_size=config.otlp_queue_size,
                delay_s=config.otlp_delay_ms / 1000,
            )
            self.processors.add_span_processor(self.exporter)
            exporting = True
        for processor in extra_processors or []:
            self.processors.add_span_processor(processor)
            exporting = True
        self.exporting = exporting
        self.tracer = LeanTracer(self.resource, self.processors, "gateway")

    def should_record(self, headers: Mapping[str, str]) -> bool:
        if not self.exporting:
            return False
        if self.policy == "all":
            return True
        if self.policy == "selective":
            return headers.get("X-Sourcegraph-Should-Trace", "").lower() in _TRUTHY
        return False

    def start_request_span(self, name: str, headers: Mapping[str, str], attributes: dict[str, Any]) -> Span:
        """The request's server span, made current in the calling task.

        Call it from inside the request's own task (a handler's ``prepare``),
        never from a callback shared between requests.
        """
        parent: SpanContext | None = None
        if "traceparent" in headers:
            parent = trace.get_current_span(_PROPAGATOR.extract(carrier=headers)).get_span_context()
        span: Span
        if self.should_record(headers):
            attributes["sampling.retain"] = True
            span = self.tracer.start_span(name, parent, kind=SpanKind.SERVER, attributes=attributes)
        else:
            trace_id, span_id = self.tracer.new_ids(parent)
            span = NonRecordingSpan(SpanContext(trace_id=trace_id, span_id=span_id, is_remote=False, trace_flags=TraceFlags(0)))
        # Never detached: the request's task ends with the request.
        otel_context.attach(trace.set_span_in_context(span))
        _REQUEST_IDS.set(span_ids(span))
        return span

    def start_child(self, name: str, parent: Span | None, attributes: dict[str, Any] | None = None) -> Span:
        """A child of ``parent`` (a no-op span if ``parent`` is not recording); the caller ends it.

        It is not made current: nothing below the pipeline's own steps reads
        the current span (log lines use the request's ids), and attaching a
        context per step was a measurable share of a request.
        """
        if parent is None or not parent.is_recording():
            return trace.INVALID_SPAN
        return self.tracer.start_span(name, parent.get_span_context(), attributes=attributes)

    def past_span(
        self,
        parent: Span | None,
        name: str,
        started: float,
        ended: float,
        attributes: dict[str, Any] | None = None,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> Span:
        """A child span for work that already happened, from ``time.monotonic()`` stamps.

        Lets the pipeline keep two timestamps instead of holding a span open
        across its relay loop; the span carries the real start and end times.
        The parent may have ended already (an upstream call's span, for its
        attempts): what matters is that it was sampled.
        """
        if parent is None:
            return trace.INVALID_SPAN
        parent_context = parent.get_span_context()
        if not parent_context.is_valid or not parent_context.trace_flags.sampled:
            return trace.INVALID_SPAN
        now_ns = time.time_ns()
        now_mono = time.monotonic()
        start_ns = now_ns - int((now_mono - started) * 1e9)
        end_ns = now_ns - int((now_mono - ended) * 1e9)
        span = self.tracer.start_span(name, parent_context, kind=kind, attributes=attributes, start_time=start_ns)
        span.end(end_time=max(start_ns, end_ns))
        return span

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        return self.processors.force_flush(timeout_ms)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Post the spans still queued, from the loop, before ``shutdown``."""
        if self.exporter is not None:
            await self.exporter.aclose(timeout_s)

    def shutdown(self) -> None:
        self.processors.shutdown()


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL from either a base endpoint or the full traces URL."""
    url = endpoint.rstrip("/")
    return url if url.endswith("/v1/traces") else url + "/v1/traces"


def span_ids(span: Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def current_ids() -> tuple[str, str] | None:
    """Trace id and server span id of the request served by this task, if any."""
    return _REQUEST_IDS.get()


def mark_error(span: Span, exc: BaseException) -> None:
    """An error status naming the exception's type; client errors (4xx) are not span errors."""
    status = getattr(exc, "status", None)
    span.set_attribute("error.type", type(exc).__name__)
    if isinstance(status, int) and status < 500:
        return
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


def genai_attributes(
    *,
    provider: str,
    operation: str,
    model: str | None,
    stream: bool | None = None,
    max_tokens: int | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    cache_read_tokens: int | None = None,
    cache_creation_tokens: int | None = None,
    reasoning_tokens: int | None = None,
) -> dict[str, Any]:
    """OpenTelemetry GenAI semantic-convention attributes for one model call.

    ``model`` is the model as sent upstream (without the ``provider/``
    prefix); unknown numbers are left out rather than reported as zero.
    """
    system = GENAI_SYSTEMS.get(provider, provider)
    attributes: dict[str, Any] = {
        "gen_ai.system": system,
        "gen_ai.provider.name": system,
        "gen_ai.operation.name": GENAI_OPERATIONS.get(operation, "chat"),
    }
    if model:
        attributes["gen_ai.request.model"] = model
    for name, value in (
        ("gen_ai.request.stream", stream),
        ("gen_ai.request.max_tokens", max_tokens),
        ("gen_ai.usage.input_tokens", input_tokens),
        ("gen_ai.usage.output_tokens", output_tokens),
        # Parts of the totals above, named as in the current GenAI semantic conventions.
        ("gen_ai.usage.cache_read.input_tokens", cache_read_tokens),
        ("gen_ai.usage.cache_creation.input_tokens", cache_creation_tokens),
        ("gen_ai.usage.reasoning.output_tokens", reasoning_tokens),
    ):
        if value is not None:
            attributes[name] = value
    return attributes


def limiter_attributes(rule: Any, decision: Any | None) -> dict[str, Any]:
    """The reference's ``actor.Limiter.TryAcquire`` attributes, from a LimitRule and Decision.

    Ours is a token bucket, so ``currentUsage``/``incrementedTo`` are the
    bucket's used capacity after the decision and ``ttlSeconds`` the time
    until it is full again.
    """
    attributes: dict[str, Any] = {}
    if rule is not None:
        attributes["feature"] = rule.feature
        attributes["limit"] = rule.limit
        attributes["intervalSeconds"] = rule.interval_s
        attributes["concurrency"] = rule.concurrency
    if decision is not None:
        used = max(0, decision.limit - decision.remaining)
        attributes["allowed"] = decision.allowed
        attributes["limit"] = decision.limit
        attributes["currentUsage"] = used
        attributes["incrementedTo"] = used
        attributes["ttlSeconds"] = round(decision.reset_s, 3)
        if not decision.allowed:
            attributes["cause"] = decision.cause or ""
            attributes["retryAfterSeconds"] = round(decision.retry_after_s, 3)
    return attributes
