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
        if "trace_id" not in payload:
            ids = current_ids()
            if ids is not None:
                payload["trace_id"], payload["span_id"] = ids
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return self.scrubber(orjson.dumps(payload, default=str).decode())


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
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
        if logger.isEnabledFor(self.level):
            # makeRecord + handle skips the caller lookup (a stack walk) of logger.log:
            # the caller is always this line.
            record = logger.makeRecord(logger.name, self.level, __file__, 0, "request", (), None, extra=fields)
            logger.handle(record)
