"""The log scrubber: tokens, provider keys and configured secrets never reach a log line."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

from conf.loader import load_config
from telemetry.logs import AccessLog, JsonFormatter, LineHandler, Scrubber, config_secrets, direct_line_handler

TOKEN = "sgd_" + "c" * 64


def test_token_shapes_and_configured_secrets_are_masked() -> None:
    config = load_config(
        environ={
            "CODY_GATEWAY_DIAGNOSTICS_SECRET": "diag-Secret-42",
            "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": "anthropic-upstream-key-1",
            "CODY_GATEWAY_SENTRY_DSN": "https://abcdef0123456789@sentry.example/7",
            "REDIS_ENDPOINT": "redis://user:redis-pass-99@127.0.0.1:6379/0",
        }
    )
    scrub = Scrubber(config_secrets(config))
    line = (
        f"Authorization: Bearer {TOKEN} key=anthropic-upstream-key-1 diag=diag-Secret-42 "
        "openai=sk-proj-abcdefghijklmnop0123 hook=https://hooks.slack.com/services/T1/B2/xyz "
        "redis=redis://user:redis-pass-99@127.0.0.1:6379/0 dsn-key=abcdef0123456789 "
        f"slk={'slk_' + 'd' * 64}"
    )
    out = scrub(line)
    for secret in (TOKEN, "anthropic-upstream-key-1", "diag-Secret-42", "sk-proj-abcdefghijklmnop0123",
                   "hooks.slack.com/services", "redis-pass-99", "abcdef0123456789", "slk_" + "d" * 64):
        assert secret not in out, secret
    # Ordinary text is left alone, including words next to "token".
    plain = "token bucket refilled; input_tokens=12 output_tokens=3 model anthropic/claude-3-haiku-20240307"
    assert scrub(plain) == plain


def test_the_json_formatter_scrubs_messages_extras_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    formatter = JsonFormatter()
    formatter.scrubber.add(["very-secret-value"])
    handler.setFormatter(formatter)
    logger = logging.getLogger("test.observability.logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("lookup failed for %s", TOKEN, extra={"detail": "very-secret-value"})
        try:
            raise ValueError(f"bad token {TOKEN}")
        except ValueError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert TOKEN not in text and "very-secret-value" not in text
    first = json.loads(text.splitlines()[0])
    assert first["msg"] == "lookup failed for [REDACTED]" and first["detail"] == "[REDACTED]"


@contextlib.contextmanager
def root_line_handler() -> Iterator[tuple[LineHandler, io.StringIO]]:
    """The process's handler (as configure_logging sets it up) writing into a buffer, alone on the root.

    Set up inside the test body: pytest adds its own capturing handler to the
    root when the test's call phase begins.
    """
    stream = io.StringIO()
    handler = LineHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    saved, saved_level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield handler, stream
    finally:
        root.handlers[:] = saved
        root.setLevel(saved_level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_info_lines_on_the_loop_are_written_per_iteration_and_warnings_at_once() -> None:
    with root_line_handler() as (_, stream):
        _info_and_warnings(stream)


def _info_and_warnings(stream: io.StringIO) -> None:
    log = logging.getLogger("gateway.test.lines")

    async def scenario() -> None:
        log.info("first")
        log.info("second")
        assert stream.getvalue() == ""  # queued until the loop comes round
        await asyncio.sleep(0)
        assert [line["msg"] for line in lines(stream)] == ["first", "second"]
        log.info("third")
        log.warning("trouble")  # at once, after what was queued
        assert [line["msg"] for line in lines(stream)] == ["first", "second", "third", "trouble"]

    asyncio.run(scenario())
    # Off the loop (another thread, or no loop at all): at once.
    log.info("no loop")
    assert lines(stream)[-1]["msg"] == "no loop"


def test_the_access_line_is_the_same_without_a_log_record() -> None:
    with root_line_handler() as (handler, stream):
        _access_line(handler, stream)


def _access_line(handler: LineHandler, stream: io.StringIO) -> None:
    handler.formatter.scrubber.add(["very-secret-value"])  # type: ignore[union-attr]
    access = AccessLog(enabled=True)
    fields = {"method": "POST", "path": "/v1/x", "status": 200, "duration_ms": 1.5, "user_agent": f"agent {TOKEN}", "error": "very-secret-value"}
    assert direct_line_handler(access.logger) is handler
    access.write(dict(fields))  # the direct path (no loop running: written at once)
    blocked = logging.Filter("nothing")  # a filter anywhere on the way: the logging path
    access.logger.addFilter(blocked)
    try:
        assert direct_line_handler(access.logger) is None
        access.logger.removeFilter(blocked)
        logging.getLogger("gateway").addHandler(capture := logging.StreamHandler(io.StringIO()))
        assert direct_line_handler(access.logger) is None  # a handler on the way sees records
        logging.getLogger("gateway").removeHandler(capture)
        record = access.logger.makeRecord(access.logger.name, logging.INFO, __file__, 0, "request", (), None, extra=dict(fields))
        handler.handle(record)
    finally:
        access.logger.removeFilter(blocked)
    direct, via_record = lines(stream)
    assert direct.pop("ts")[:16] == via_record.pop("ts")[:16]
    assert direct == via_record
    assert direct["level"] == "info" and direct["logger"] == "gateway.access" and direct["msg"] == "request"
    assert TOKEN not in stream.getvalue() and "very-secret-value" not in stream.getvalue()
