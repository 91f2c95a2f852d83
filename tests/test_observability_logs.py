"""The log scrubber: tokens, provider keys and configured secrets never reach a log line."""

from __future__ import annotations

import io
import json
import logging

from conf.loader import load_config
from telemetry.logs import JsonFormatter, Scrubber, config_secrets

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
