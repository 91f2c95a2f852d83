"""Structured JSON logs on stderr: one object per line, nothing secret in them.

Every line logged while a request is being served carries that request's
``trace_id`` and ``span_id``. Every line goes through a ``Scrubber`` that
masks bearer tokens, provider keys and the configured secret values, so a
secret that slips into an exception message still never reaches the log
(or Sentry, which reuses the scrubber).

The access log is one line per request (logger ``gateway.access``):
method, path, status, duration, actor, feature, model, trace id and the
upstream figures. It never holds a header value, a query string or a body.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson

from conf.model import Config
from telemetry.tracing import current_ids

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}

ACCESS_LOGGER = "gateway.access"
REDACTED = "[REDACTED]"

# Token shapes worth masking wherever they appear: gateway tokens (sgd_, slk_,
# sgs_, sgp_ and similar), provider keys, bearer credentials, Slack webhooks
# and credentials embedded in URLs.
_PATTERNS = (
    r"\b(?:sgd|slk|sgs|sgp|sgph|sk-ant|sk-proj|sk)[_-][A-Za-z0-9_\-]{16,}",
    r"\b(?i:bearer|token)\s+[A-Za-z0-9_\-.=+/]{16,}",
    r"https://hooks\.slack\.com/[^\s\"']+",
    r"(?<=://)[^/@\s\"':]+:[^/@\s\"']+(?=@)",
    r"(?<=://)[0-9a-f]{32}(?=@)",
)
_MIN_SECRET_LEN = 6
# Every pattern above needs one of these (in lower case) to match; a line
# without any of them skips the regex, which is most of the cost.
_MARKERS = ("sgd_", "slk_", "sgs_", "sgp", "sk-", "bearer", "token ", "token\t", "hooks.slack", "@")


class Scrubber:
    """Masks secrets in text; the configured secret values are added at start."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._regex = re.compile("|".join(_PATTERNS))
        self._markers: tuple[str, ...] = _MARKERS
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        fresh = {s for s in secrets if s and len(s) >= _MIN_SECRET_LEN} - self._secrets
        if not fresh:
            return
        self._secrets |= fresh
        # Longest first so a secret that contains another is masked whole.
        literal = "|".join(re.escape(s) for s in sorted(self._secrets, key=len, reverse=True))
        self._regex = re.compile(literal + "|" + "|".join(_PATTERNS))
        self._markers = _MARKERS + tuple(s.lower() for s in self._secrets)

    def __call__(self, text: str) -> str:
        lowered = text.lower()
        for marker in self._markers:
            if marker in lowered:
                return self._regex.sub(REDACTED, text)
        return text


def config_secrets(config: Config) -> list[str]:
    """Every secret value the configuration holds (the schema's x-secret keys and URL passwords)."""
    providers = config.providers
    values = [
        config.diagnostics_secret,
        providers.anthropic.access_token,
        providers.openai.access_token,
        providers.fireworks.access_token,
        providers.google.access_token,
        providers.sourcegraph_embeddings.access_token,
        config.actors.dotcom_access_token,
        config.telemetry.sentry_dsn,
        config.telemetry.slack_webhook_url,
    ]
    for url in (config.redis.endpoint, config.redis.cache_endpoint):
        values.append(urlsplit(url).password or "" if url else "")
    if config.telemetry.sentry_dsn:
        # The DSN's public key is its user part.
        values.append(urlsplit(config.telemetry.sentry_dsn).username or "")
    return [v for v in values if v]


# Fields every line of this process carries (the worker index in pre-fork mode).
_PROCESS_FIELDS: dict[str, Any] = {}


def tag_worker(index: int) -> None:
    """Every line this process logs from now on names its worker, so on-call can tell workers apart."""
    _PROCESS_FIELDS["worker"] = index


class JsonFormatter(logging.Formatter):
    def __init__(self, scrubber: Scrubber | None = None) -> None:
        super().__init__()
        self.scrubber = scrubber or Scrubber()
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": self._timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if _PROCESS_FIELDS:
            payload.update(_PROCESS_FIELDS)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key[0] != "_":
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return self._finish(payload)

    def format_fields(self, level: str, logger: str, msg: str, fields: dict[str, Any]) -> str:
        """The line ``format`` makes of a record with these extra fields, without a LogRecord."""
        now = time.time()
        payload: dict[str, Any] = {"ts": self._timestamp(now, (now - int(now)) * 1000), "level": level, "logger": logger, "msg": msg}
        if _PROCESS_FIELDS:
            payload.update(_PROCESS_FIELDS)
        payload.update(fields)
        return self._finish(payload)

    def _finish(self, payload: dict[str, Any]) -> str:
        if "trace_id" not in payload:
            ids = current_ids()
            if ids is not None:
                payload["trace_id"], payload["span_id"] = ids
        return self.scrubber(orjson.dumps(payload, default=str).decode())


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The process's log handler: one JSON line per record on a stream (stderr).

    Info and debug lines logged on the event loop are written once per loop
    iteration, together (the access log is a line per request, and a write
    and flush each was a system call per request); warnings and errors, and
    lines from other threads, are written at once, after what is pending, so
    nothing that explains a failure waits. At most one loop iteration of info
    lines is lost if the process is killed outright.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        # The loop a drain is scheduled on (None: none is). Under the handler's
        # lock, with the queue: a line may come from any thread.
        self._drain_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write_line(line, record.levelno)

    def write_line(self, line: str, levelno: int) -> None:
        """Write (or queue, see the class) one formatted line."""
        if levelno < logging.WARNING:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                with self.lock:  # type: ignore[union-attr]
                    self._pending.append(line)
                    schedule = self._drain_loop is not loop
                    self._drain_loop = loop
                if schedule:
                    loop.call_soon(self.drain)
                return
        with self.lock:  # type: ignore[union-attr]
            self._write([*self._take(), line])

    def drain(self) -> None:
        """Write the queued lines (the loop calls this once per iteration; also at exit)."""
        with self.lock:  # type: ignore[union-attr]
            lines = self._take()
            if lines:
                self._write(lines)

    def flush(self) -> None:
        self.drain()
        super().flush()

    def _take(self) -> list[str]:
        lines, self._pending = self._pending, []
        self._drain_loop = None
        return lines

    def _write(self, lines: list[str]) -> None:
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:  # a closed or broken stream: as StreamHandler, report and go on
            self.handleError(logging.makeLogRecord({"msg": "log write failed", "levelno": logging.ERROR}))


def flush_logs() -> None:
    """Write what the root's handlers hold; call before ``os._exit`` (which skips atexit)."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # exiting anyway
            pass


def direct_line_handler(logger: logging.Logger) -> LineHandler | None:
    """The LineHandler a record of ``logger`` would reach, when nothing else would see it.

    Lets the access log skip building a LogRecord: only when no logger on the
    way has a handler or filter of its own and the root has exactly one
    handler, a LineHandler with a JsonFormatter (anything else, tests capturing
    logs included, gets real records).
    """
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        if current.parent is None:  # the root
            handlers = current.handlers
            if len(handlers) != 1:
                return None
            handler = handlers[0]
            if type(handler) is not LineHandler or handler.filters or not isinstance(handler.formatter, JsonFormatter):
                return None
            return handler
        if current.handlers or not current.propagate:
            return None
        current = current.parent
    return None


def configure_logging(level: str) -> None:
    handler = LineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    # What is queued at exit is written (logging's own shutdown flushes handlers too).
    atexit.register(handler.drain)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Our lines never show thread or process names: skip looking them up per record.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Tornado's own access log duplicates ours.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    # At debug level curl's client logs request headers and URLs (an upstream
    # key, Google's ?key=): never let it.
    logging.getLogger("tornado.curl_httpclient").setLevel(logging.INFO)


def add_secrets_to_log_scrubbing(secrets: Iterable[str]) -> Scrubber:
    """Teach every JSON formatter on the root logger the configured secrets; returns a scrubber
    holding them (for Sentry and anything else that ships text out)."""
    values = list(secrets)
    shared: Scrubber | None = None
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, JsonFormatter):
            formatter.scrubber.add(values)
            shared = shared or formatter.scrubber
    if shared is None:
        shared = Scrubber(values)
    return shared


class AccessLog:
    """One JSON line per request on ``gateway.access`` (info level, or debug when disabled
    in the config so it can still be switched on with the log level)."""

    def __init__(self, *, enabled: bool) -> None:
        self.logger = logging.getLogger(ACCESS_LOGGER)
        self.level = logging.INFO if enabled else logging.DEBUG

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(self.level)

    def write(self, fields: dict[str, Any]) -> None:
        logger = self.logger
        if not logger.isEnabledFor(self.level):
            return
        handler = direct_line_handler(logger)
        if handler is not None and self.level >= handler.level:
            # The line the logging path would write, without its LogRecord and handler walk.
            formatter = handler.formatter
            assert isinstance(formatter, JsonFormatter)
            level_name = logging.getLevelName(self.level).lower()
            handler.write_line(formatter.format_fields(level_name, logger.name, "request", fields), self.level)
            return
        # makeRecord + handle skips the caller lookup (a stack walk) of logger.log:
        # the caller is always this line.
        record = logger.makeRecord(logger.name, self.level, __file__, 0, "request", (), None, extra=fields)
        logger.handle(record)
