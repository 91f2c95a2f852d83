"""Sentry, when a DSN is configured: unhandled errors, 5xx responses and error logs.

What goes out, and what never does:

* an unhandled exception in a handler becomes one Sentry event, sent when
  the request ends so that it carries the request's tags (``actor_id``,
  ``actor_source``, ``trace_id``, route, provider, feature, model, status);
* a 5xx response without such an exception becomes one message event with
  the same tags, grouped by route, provider and status, and at most
  ``per_minute`` of each group a minute (an upstream outage must not flood
  Sentry);
* an error-level log line outside any request (the event sink, the sync
  worker) becomes a message event, rate-limited the same way, as in the
  reference ("error-level logs go to Sentry"); inside a request it is
  attached to that request's event instead;
* never a request body, header, query string, cookie or local variable:
  no integration that reads them is enabled, stack frames carry no
  variables, and every message and exception text passes the log scrubber
  (tokens and the configured secrets) and is cut to ``MAX_TEXT`` characters.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from telemetry.tracing import current_ids

if TYPE_CHECKING:
    from sentry_sdk.types import Event, Hint

log = logging.getLogger("gateway.sentry")

MAX_TEXT = 500
_MAX_PENDING_REQUESTS = 1000
_MAX_RECORDS_PER_REQUEST = 5
# Loggers whose records must not become Sentry events (the transport's own, or noise).
_IGNORED_LOGGERS = ("sentry_sdk", "urllib3", "gateway.access", "gateway.sentry")


class _RateLimit:
    """At most ``per_minute`` per key, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[Any, tuple[float, float]] = {}
        self.suppressed = 0

    def allow(self, key: Any) -> bool:
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            self.suppressed += 1
            return False
        if len(self._buckets) > 10_000:
            self._buckets.clear()
        self._buckets[key] = (tokens - 1, now)
        return True


class SentryReporter:
    def __init__(
        self,
        dsn: str,
        *,
        environment: str,
        release: str,
        scrubber: Callable[[str], str],
        per_minute: int = 20,
    ) -> None:
        self.dsn = dsn
        self.environment = environment
        self.release = release
        self.scrub = scrubber
        self.limit = _RateLimit(per_minute)
        self._pending: OrderedDict[str, list[logging.LogRecord]] = OrderedDict()
        self._handler: _SentryLogHandler | None = None
        self.captured = 0

    def start(self) -> None:
        import sentry_sdk

        sentry_sdk.init(
            dsn=self.dsn,
            environment=self.environment,
            release=self.release,
            # Only what we capture ourselves: no integration that reads requests,
            # Redis commands or log breadcrumbs (any of them could carry a prompt).
            default_integrations=False,
            auto_enabling_integrations=False,
            include_local_variables=False,
            max_request_body_size="never",
            max_breadcrumbs=0,
            before_send=self._before_send,
            traces_sample_rate=None,
        )
        self._handler = _SentryLogHandler(self)
        logging.getLogger().addHandler(self._handler)

    def close(self, timeout_s: float = 2.0) -> None:
        """Flush and stop the transport (blocks up to ``timeout_s``: call from an executor)."""
        import sentry_sdk

        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler = None
        for records in self._pending.values():
            for record in records:
                self._capture_record(record, {})
        self._pending.clear()
        client = sentry_sdk.get_client()
        if client.is_active():
            client.close(timeout=timeout_s)

    # -- per request ----------------------------------------------------------------

    def request_finished(self, span_id: str, status: int, tags: Mapping[str, str]) -> None:
        records = self._pending.pop(span_id, None) if self._pending else None
        if not records and status < 500:
            return
        errors = [self._record_text(r) for r in records or ()]
        for record in records or ():
            if record.exc_info and record.exc_info[1] is not None:
                self._send(
                    "exception", tags, exc_info=record.exc_info, errors=errors,
                    fingerprint=["unhandled", tags.get("route", ""), type(record.exc_info[1]).__name__],
                )
                return
        if status >= 500:
            key = ("5xx", tags.get("route", ""), tags.get("provider", ""), status)
            if self.limit.allow(key):
                message = f"HTTP {status} from {tags.get('method', '')} {tags.get('route', '')}"
                if tags.get("provider"):
                    message += f" ({tags['provider']})"
                self._send("message", tags, message=message, errors=errors, fingerprint=[str(k) for k in key])
            return
        for record in records or ():
            self._capture_record(record, tags)

    # -- log records -----------------------------------------------------------------

    def on_log_record(self, record: logging.LogRecord) -> None:
        ids = current_ids()
        if ids is not None:
            span_id = ids[1]
            records = self._pending.get(span_id)
            if records is None:
                records = self._pending[span_id] = []
                while len(self._pending) > _MAX_PENDING_REQUESTS:
                    _, stale = self._pending.popitem(last=False)
                    for old in stale:
                        self._capture_record(old, {})
            if len(records) < _MAX_RECORDS_PER_REQUEST:
                records.append(record)
            return
        self._capture_record(record, {})

    def _capture_record(self, record: logging.LogRecord, tags: Mapping[str, str]) -> None:
        if not self.limit.allow(("log", record.name, str(record.msg))):
            return
        tags = {**tags, "logger": record.name}
        if record.exc_info and record.exc_info[1] is not None:
            self._send("exception", tags, exc_info=record.exc_info, errors=[self._record_text(record)])
        else:
            self._send("message", tags, message=self._record_text(record))

    def _record_text(self, record: logging.LogRecord) -> str:
        try:
            text = record.getMessage()
        except Exception:  # a bad format string must not lose the report
            text = str(record.msg)
        return self.scrub(text[:MAX_TEXT])

    # -- sending ------------------------------------------------------------------------

    def _send(
        self,
        kind: str,
        tags: Mapping[str, str],
        *,
        message: str = "",
        exc_info: Any = None,
        errors: list[str] | None = None,
        fingerprint: list[str] | None = None,
    ) -> None:
        import sentry_sdk

        scope_kwargs: dict[str, Any] = {"tags": {k: v for k, v in tags.items() if v}}
        if fingerprint:
            scope_kwargs["fingerprint"] = fingerprint
        if errors:
            scope_kwargs["extras"] = {"error_logs": errors}
        try:
            if kind == "exception":
                sentry_sdk.capture_exception(exc_info, **scope_kwargs)
            else:
                sentry_sdk.capture_message(message, level="error", **scope_kwargs)
            self.captured += 1
        except Exception:  # reporting must never break a request
            log.debug("sentry capture failed", exc_info=True)

    def _before_send(self, event: Event, hint: Hint) -> Event | None:
        event.pop("request", None)
        event.pop("user", None)
        event.pop("breadcrumbs", None)
        event.pop("modules", None)
        scrub = self.scrub
        if isinstance(event.get("message"), str):
            event["message"] = scrub(event["message"][:MAX_TEXT])
        logentry = event.get("logentry")
        if isinstance(logentry, dict):
            for key in ("message", "formatted"):
                if isinstance(logentry.get(key), str):
                    logentry[key] = scrub(logentry[key][:MAX_TEXT])
            logentry.pop("params", None)
        for value in (event.get("exception") or {}).get("values") or ():
            if isinstance(value.get("value"), str):
                value["value"] = scrub(value["value"][:MAX_TEXT])
            for frame in (value.get("stacktrace") or {}).get("frames") or ():
                frame.pop("vars", None)
        extra = event.get("extra")
        if isinstance(extra, dict):
            event["extra"] = _scrub_tree(extra, scrub)
        return event


def _scrub_tree(value: Any, scrub: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return scrub(value[:MAX_TEXT])
    if isinstance(value, dict):
        return {k: _scrub_tree(v, scrub) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_tree(v, scrub) for v in value]
    return value


class _SentryLogHandler(logging.Handler):
    def __init__(self, reporter: SentryReporter) -> None:
        super().__init__(level=logging.ERROR)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_IGNORED_LOGGERS):
            return
        try:
            self.reporter.on_log_record(record)
        except Exception:  # logging must never raise
            self.handleError(record)
