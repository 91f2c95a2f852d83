"""Everything on-call sees about a request, from the handlers' instrumentation points.

``install_observability(services, ...)`` builds the Prometheus metrics, the
request log, Sentry (when a DSN is set) and the quota notifier, and plugs
one ``Observability`` into the services: as ``services.extras`` hooks that
the pipeline already calls (``on_request_finished``, ``on_rate_limited``,
``on_completion_finished``), and as ``services.observe`` /
``services.extras["observe"]`` for the wrappers of ``telemetry.observer``.

Per request this costs a few dictionary lookups, a handful of metric
updates and one log line; nothing runs per streamed chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

from opentelemetry.trace import SpanKind

from conf.model import Config
from telemetry.logs import AccessLog, add_secrets_to_log_scrubbing, config_secrets
from telemetry.metrics import FEATURES, OTHER, GatewayMetrics, RequestFacts
from telemetry.notify import QuotaNotifier
from telemetry.observer import Observer
from telemetry.sentry import SentryReporter
from telemetry.tracing import (
    GENAI_OPERATIONS,
    SPAN_AUTH,
    SPAN_EVENT,
    SPAN_LIMITER,
    Tracing,
    genai_attributes,
    limiter_attributes,
)

log = logging.getLogger("gateway.telemetry")

T = TypeVar("T")

QUOTA = "quota"
_MAX_TEXT = 200
_SAMPLE_INTERVAL_MS = 5000


def build_metrics(config: Config, version: str) -> GatewayMetrics:
    """The one metrics registry, sized from the configuration (providers, allowlisted models)."""
    providers = config.providers
    enabled: list[str] = []
    models: set[str] = set()
    for name, provider in (
        ("anthropic", providers.anthropic),
        ("openai", providers.openai),
        ("fireworks", providers.fireworks),
        ("google", providers.google),
    ):
        if provider.access_token:
            enabled.append(name)
        models.update(f"{name}/{model}" for model in provider.allowed_models)
    if providers.sourcegraph_embeddings.access_token:
        enabled.append("sourcegraph")
    models.update(config.embeddings.allowed_models)
    return GatewayMetrics(version=version, providers=enabled, models=models)


class Observability(Observer):
    def __init__(
        self,
        *,
        tracing: Tracing,
        metrics: GatewayMetrics,
        access_log: AccessLog,
        sentry: SentryReporter | None = None,
        notifier: QuotaNotifier | None = None,
    ) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.access_log = access_log
        self.sentry = sentry
        self.notifier = notifier
        # Per-request notes, dropped with the handler.
        self._decisions: WeakKeyDictionary[Any, Any] = WeakKeyDictionary()
        self._usage: WeakKeyDictionary[Any, tuple[int | None, int | None]] = WeakKeyDictionary()
        self._attempts: WeakKeyDictionary[Any, list[Any]] = WeakKeyDictionary()
        self._embeddings: WeakKeyDictionary[Any, dict[str, Any]] = WeakKeyDictionary()
        # Until the limiter call is wrapped (``limiter``), decisions are inferred
        # from the pipeline's hooks; once it is, the wrapper is the only source.
        self.wired: dict[str, bool] = {"auth": False, "limiter": False, "upstream": False, "attempts": False, "events": False}
        self.hook_errors = 0

    # -- wrappers (telemetry.observer.Observer) -------------------------------------

    async def auth(self, handler: Any, lookup: Awaitable[T]) -> T:
        self.wired["auth"] = True
        with self.tracing.child_span(getattr(handler, "span", None), SPAN_AUTH) as span:
            try:
                actor = await lookup
            except Exception as exc:
                self.metrics.auth_result(str(getattr(exc, "source", "") or "none"), _auth_outcome(exc))
                raise
            source = getattr(actor, "source", "") or "none"
            span.set_attribute("matched_source", source)
            self.metrics.auth_result(source, "ok")
            return actor

    async def limiter(self, handler: Any, rule: Any, acquire: Awaitable[T]) -> T:
        self.wired["limiter"] = True
        feature = _feature_label(getattr(rule, "feature", None))
        started = time.monotonic()
        with self.tracing.child_span(getattr(handler, "span", None), SPAN_LIMITER, limiter_attributes(rule, None)) as span:
            try:
                decision: Any = await acquire
            except Exception:
                self.metrics.limiter_decision(feature, "unavailable", time.monotonic() - started)
                raise
            allowed = bool(decision.allowed)
            self.metrics.limiter_decision(feature, "allowed" if allowed else (decision.cause or QUOTA), time.monotonic() - started)
            if span.is_recording():
                span.set_attributes(limiter_attributes(rule, decision))
            if allowed:
                self._decisions[handler] = decision
            return decision  # type: ignore[no-any-return]

    async def upstream(self, handler: Any, relay: Awaitable[T]) -> T:
        self.wired["upstream"] = True
        provider = _provider_name(handler)
        feature = _feature_label(getattr(handler, "feature", None))
        self.metrics.upstream_started(provider, feature)
        try:
            return await relay
        finally:
            self.metrics.upstream_ended(provider, feature)

    def upstream_attempt(self, handler: Any, attempt: Any) -> None:
        self.wired["attempts"] = True
        status = getattr(attempt, "status", None)
        outcome = getattr(attempt, "outcome", "ok")
        self.metrics.upstream_attempt(_provider_name(handler), str(status) if outcome == "ok" and status else outcome)
        span = getattr(handler, "span", None)
        if span is not None and span.is_recording():
            self._attempts.setdefault(handler, []).append(attempt)

    def record_event(self, handler: Any, event: Any, recorder: Any) -> None:
        self.wired["events"] = True
        span = getattr(handler, "span", None)
        if span is None or not span.is_recording():
            recorder.record(event)
            return
        with self.tracing.child_span(span, SPAN_EVENT, {"source": event.source, "event.name": event.name}) as child:
            recorder.record(event)
            backlog = getattr(recorder, "backlog", None)
            child.set_attribute("event.buffered", backlog is not None)
            if isinstance(backlog, int):
                child.set_attribute("buffer.backlog", backlog)

    # -- hooks the pipeline calls through services.extras ------------------------------

    def rate_limited(self, handler: Any, decision: Any) -> None:
        try:
            feature = _feature_label(getattr(handler, "feature", None))
            if not self.wired["limiter"]:
                self.metrics.limiter_decision(feature, decision.cause or QUOTA)
            actor = getattr(handler, "actor", None)
            if self.notifier is not None and actor is not None and decision.cause == QUOTA:
                self.notifier.notify(actor, handler.feature, 1.0, decision.retry_after_s)
        except Exception:  # noqa: BLE001 - telemetry must never fail a request
            self._hook_failed("on_rate_limited")

    def completion_finished(self, handler: Any, usage: Any) -> None:
        try:
            self._completion_finished(handler, usage)
        except Exception:  # noqa: BLE001
            self._hook_failed("on_completion_finished")

    def _completion_finished(self, handler: Any, usage: Any) -> None:
        input_tokens = getattr(usage, "prompt_tokens", None)
        output_tokens = getattr(usage, "completion_tokens", None)
        if self.access_log.enabled:
            self._usage[handler] = (input_tokens, output_tokens)
        provider = _provider_name(handler)
        model = getattr(handler, "model", None)
        model_label = self.metrics.model_label(model)
        feature = _feature_label(getattr(handler, "feature", None))
        self.metrics.observe_tokens(provider, model_label, feature, input_tokens, output_tokens)
        span = getattr(handler, "span", None)
        if span is None or not span.is_recording():
            return
        call = getattr(handler, "call", None)
        info = getattr(call, "info", None)
        upstream_model = getattr(info, "model", None) or (model.split("/", 1)[-1] if model else None)
        operation = getattr(getattr(handler, "provider", None), "operation", getattr(handler, "operation", ""))
        genai = genai_attributes(
            provider=provider,
            operation=operation,
            model=upstream_model,
            stream=getattr(info, "stream", None),
            max_tokens=getattr(info, "max_tokens", None),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )
        upstream_status = getattr(handler, "upstream_status", None)
        status = handler.get_status()
        request_attributes: dict[str, Any] = {
            **genai,
            "feature": feature,
            "model": model_label,
            "upstreamStatusCode": upstream_status if upstream_status is not None else -1,
            "resolvedStatusCode": status,
            "outcome": getattr(handler, "outcome", "") or "",
            "chunks": getattr(handler, "chunks_relayed", 0) or 0,
        }
        ttfb = getattr(handler, "time_to_first_byte_s", None)
        if ttfb is not None:
            request_attributes["time_to_first_byte_ms"] = round(ttfb * 1000, 3)
        span.set_attributes(request_attributes)
        started = getattr(handler, "upstream_started", None)
        if started is None:
            return
        ended = getattr(handler, "upstream_ended", None) or time.monotonic()
        upstream_attributes = dict(genai)
        upstream_attributes["upstream.provider"] = provider
        if upstream_status is not None:
            upstream_attributes["http.response.status_code"] = upstream_status
        attempts = self._attempts.pop(handler, ())
        if len(attempts) == 1:
            # One attempt is the model call itself: its outcome goes on the call's span
            # rather than on a child span covering the same interval.
            upstream_attributes["upstream.outcome"] = attempts[0].outcome
            attempts = ()
        upstream_span = self.tracing.past_span(
            span, f"{GENAI_OPERATIONS.get(operation, 'chat')} {upstream_model or ''}".rstrip(),
            started, ended, upstream_attributes, kind=SpanKind.CLIENT,
        )
        for attempt in attempts:
            attributes: dict[str, Any] = {"upstream.outcome": attempt.outcome}
            if attempt.status is not None:
                attributes["http.response.status_code"] = attempt.status
            self.tracing.past_span(
                upstream_span, "POST", attempt.started_at, attempt.ended_at or ended, attributes, kind=SpanKind.CLIENT
            )

    def embeddings_finished(self, handler: Any, metadata: dict[str, Any]) -> None:
        """The EmbeddingsFinished event's metadata (provider, model, upstream figures, tokens)."""
        try:
            self._embeddings[handler] = metadata
            model_label = self.metrics.model_label(metadata.get("model"))
            self.metrics.observe_tokens(metadata.get("provider") or "", model_label, "embeddings", metadata.get("tokens_used"), None)
            if self.access_log.enabled:
                self._usage[handler] = (metadata.get("tokens_used"), None)
        except Exception:  # noqa: BLE001
            self._hook_failed("on_embeddings_finished")

    def request_finished(self, handler: Any, status: int, duration_s: float) -> None:
        try:
            self._request_finished(handler, status, duration_s)
        except Exception:  # noqa: BLE001
            self._hook_failed("on_request_finished")

    def _request_finished(self, handler: Any, status: int, duration_s: float) -> None:
        metrics = self.metrics
        provider = _provider_name(handler)
        raw_feature = getattr(handler, "feature", None)
        feature = _feature_label(raw_feature)
        model = getattr(handler, "model", None)
        call = getattr(handler, "call", None)
        info = getattr(call, "info", None)
        stream = getattr(info, "stream", None)
        started = getattr(handler, "upstream_started", None)
        upstream_s = None
        if started is not None:
            upstream_s = (getattr(handler, "upstream_ended", None) or time.monotonic()) - started
        ttfb = getattr(handler, "time_to_first_byte_s", None)
        upstream_status = getattr(handler, "upstream_status", None)
        embedding = self._embeddings.pop(handler, None) if self._embeddings else None
        if embedding is not None and embedding.get("upstream_request_duration_ms") is not None:
            # Embeddings keep their upstream figures in the event, not on the handler.
            upstream_s = embedding["upstream_request_duration_ms"] / 1000
            upstream_status = embedding.get("upstream_status_code")
            model = embedding.get("model") or model
            stream = False
        reached_upstream = upstream_s is not None
        outcome = getattr(handler, "outcome", "") if reached_upstream else ""
        facts = RequestFacts(
            route=getattr(handler, "route_class", OTHER),
            status=status,
            duration_s=duration_s,
            provider=provider,
            feature=feature,
            model=metrics.model_label(model),
            stream=stream,
            upstream_s=upstream_s,
            upstream_status=upstream_status,
            ttfb_s=ttfb,
            chunks=getattr(handler, "chunks_relayed", 0) or 0,
            outcome=outcome or "",
        )
        metrics.observe_request(facts)
        actor = getattr(handler, "actor", None)
        decision = self._decisions.pop(handler, None) if self.wired["limiter"] else None
        if (call is not None or reached_upstream) and not self.wired["limiter"] and raw_feature:
            # The pipeline keeps its upstream call only after an admission.
            metrics.limiter_decision(feature, "allowed")
        if self.notifier is not None and actor is not None and raw_feature and 200 <= status < 300:
            self._notify_usage(handler, actor, raw_feature, decision)

        if self.access_log.enabled:
            usage = self._usage.pop(handler, None)
            self.access_log.write(self._access_fields(handler, facts, raw_feature, model, stream, upstream_s, ttfb, usage))
        if self.sentry is not None:
            self.sentry.request_finished(getattr(handler, "span_id", ""), status, self._sentry_tags(handler, facts, raw_feature, model))

    @staticmethod
    def _access_fields(
        handler: Any, facts: RequestFacts, feature: str | None, model: Any, stream: bool | None,
        upstream_s: float | None, ttfb: float | None, usage: tuple[int | None, int | None] | None,
    ) -> dict[str, Any]:
        request = handler.request
        actor = getattr(handler, "actor", None)
        duration_s = facts.duration_s
        fields_: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "status": facts.status,
            "duration_ms": round(duration_s * 1000, 3),
            "route": facts.route,
            "actor_id": actor.id if actor is not None else None,
            "actor_source": actor.source if actor is not None else None,
            "feature": feature,
            "model": model[:_MAX_TEXT] if isinstance(model, str) else None,
            "trace_id": getattr(handler, "trace_id", ""),
            "span_id": getattr(handler, "span_id", ""),
            "remote_ip": request.remote_ip,
            "user_agent": (request.headers.get("User-Agent") or "")[:_MAX_TEXT],
        }
        if facts.provider:
            fields_["provider"] = facts.provider
        if upstream_s is not None:
            fields_["stream"] = stream
            fields_["upstream_status"] = facts.upstream_status
            fields_["upstream_ms"] = round(upstream_s * 1000, 3)
            fields_["overhead_ms"] = round(max(0.0, duration_s - upstream_s) * 1000, 3)
            fields_["ttfb_ms"] = round(ttfb * 1000, 3) if ttfb is not None else None
            fields_["chunks"] = facts.chunks
            fields_["outcome"] = facts.outcome
        if usage is not None:
            fields_["input_tokens"], fields_["output_tokens"] = usage
        if facts.status >= 400:
            # The formatter scrubs secrets from the whole line, this message included.
            message = getattr(handler, "error_message", None)
            if message:
                fields_["error"] = message[:_MAX_TEXT]
        return fields_

    @staticmethod
    def _sentry_tags(handler: Any, facts: RequestFacts, feature: str | None, model: Any) -> dict[str, str]:
        actor = getattr(handler, "actor", None)
        return {
            "actor_id": actor.id if actor is not None else "",
            "actor_source": actor.source if actor is not None else "",
            "trace_id": getattr(handler, "trace_id", ""),
            "span_id": getattr(handler, "span_id", ""),
            "route": facts.route,
            "method": handler.request.method or "",
            "provider": facts.provider,
            "feature": feature or "",
            "model": facts.model if model else "",
            "status": str(facts.status),
        }

    def _notify_usage(self, handler: Any, actor: Any, feature: str, decision: Any) -> None:
        notifier = self.notifier
        assert notifier is not None
        if decision is not None:
            limit, remaining, reset_s = decision.limit, decision.remaining, decision.reset_s
        else:
            # Until the limiter call is wrapped, the admission's figures are
            # read back from the rate-limit headers the pipeline set from it.
            headers = getattr(handler, "_headers", None)
            if headers is None or "X-RateLimit-Limit" not in headers:
                return
            try:
                limit = int(headers["X-RateLimit-Limit"])
                remaining = int(headers.get("X-RateLimit-Remaining", "0"))
                reset_s = float(headers.get("X-RateLimit-Reset", "0"))
            except ValueError:
                return
        if limit <= 0:
            return
        notifier.notify(actor, feature, (limit - max(0, remaining)) / limit, reset_s)

    def _hook_failed(self, hook: str) -> None:
        self.hook_errors += 1
        if self.hook_errors <= 10 or self.hook_errors % 1000 == 0:
            log.exception("telemetry hook %s failed (%d so far)", hook, self.hook_errors)

    # -- sampled state ------------------------------------------------------------------

    def install_samplers(self, services: Any) -> None:
        metrics = self.metrics
        metrics.add_sampler(lambda: metrics.in_flight.set(services.in_flight))
        events = services.events
        if callable(getattr(events, "stats", None)):
            metrics.add_sampler(lambda: metrics.sample_event_logger(events))
        stats = getattr(services.actors, "stats", None)
        if stats is not None:
            metrics.add_sampler(lambda: metrics.sample_actor_cache(stats))
        exporter = getattr(services.tracing, "exporter", None)
        if exporter is not None:
            metrics.add_sampler(lambda: metrics.sample_span_export(exporter.stats))
        failover = getattr(getattr(services.limiter, "stats", None), "in_outage", None)
        if failover is not None:
            metrics.add_sampler(lambda: metrics.sample_failover(services.limiter.stats))

        def circuits() -> None:
            breaker = services.extras.get("circuit_breaker")
            snapshot = getattr(breaker, "snapshot", None)
            if callable(snapshot):
                models = snapshot().get("models", {})
                metrics.sample_circuits({m: state.get("state") == "open" for m, state in models.items()})

        metrics.add_sampler(circuits)


def install_observability(
    services: Any,
    *,
    metrics: GatewayMetrics | None = None,
    http_client: Any | None = None,
    redis: Any | None = None,
) -> Observability:
    """Build and plug in metrics, request logs, Sentry and quota notifications (once).

    ``redis`` (a redis.asyncio client, or None) holds the notification locks
    and dedup keys; ``http_client`` posts to Slack. Call it from inside the
    running event loop.
    """
    existing = services.extras.get("observability")
    if isinstance(existing, Observability):
        return existing
    config: Config = services.config
    telemetry = config.telemetry
    scrubber = add_secrets_to_log_scrubbing(config_secrets(config))
    metrics = metrics or build_metrics(config, services.version)
    sentry = None
    if telemetry.sentry_dsn:
        sentry = SentryReporter(
            telemetry.sentry_dsn, environment=config.environment, release=services.version, scrubber=scrubber
        )
        sentry.start()
        log.info("Sentry reporting is on")
    notifier = None
    if any(telemetry.notify_thresholds.values()):
        notifier = QuotaNotifier(
            thresholds=telemetry.notify_thresholds,
            webhook_url=telemetry.slack_webhook_url,
            dotcom_api_url=config.actors.dotcom_api_url,
            redis=redis,
            http_client=http_client,
            on_redis_call=metrics.redis_call,
            on_outcome=metrics.notification,
        )
    observability = Observability(
        tracing=services.tracing,
        metrics=metrics,
        access_log=AccessLog(enabled=telemetry.access_log),
        sentry=sentry,
        notifier=notifier,
    )
    observability.install_samplers(services)
    extras = services.extras
    extras["observability"] = observability
    extras["observe"] = observability
    extras["metrics"] = metrics
    extras["on_request_finished"] = observability.request_finished
    extras["on_rate_limited"] = observability.rate_limited
    extras["on_completion_finished"] = observability.completion_finished
    extras["on_embeddings_finished"] = observability.embeddings_finished
    if is_dataclass(services) and any(f.name == "observe" for f in fields(services)):
        services.observe = observability

    periodic = None
    if metrics.multiproc_dir:
        # Another worker may answer the scrape: keep this one's gauges fresh.
        from tornado.ioloop import PeriodicCallback

        periodic = PeriodicCallback(metrics.sample, _SAMPLE_INTERVAL_MS)
        periodic.start()

    async def shutdown() -> None:
        if periodic is not None:
            periodic.stop()
        if notifier is not None:
            await notifier.wait_idle(timeout_s=5.0)
        if sentry is not None:
            import asyncio

            await asyncio.get_running_loop().run_in_executor(None, sentry.close)

    extras.setdefault("shutdown_hooks", []).append(shutdown)
    return observability


def _feature_label(feature: str | None) -> str:
    if not feature:
        return ""
    return feature if feature in FEATURES else OTHER


def _provider_name(handler: Any) -> str:
    """The upstream provider's name: the completions handler's provider, or the embeddings model's."""
    provider = getattr(handler, "provider", None)
    if provider is not None:
        return str(getattr(provider, "name", ""))
    request = getattr(handler, "request_", None)
    return str(getattr(getattr(request, "model", None), "provider", "") or "")


def _auth_outcome(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    return {400: "invalid", 401: "denied", 403: "forbidden", 503: "unavailable"}.get(status, "error")  # type: ignore[arg-type]
