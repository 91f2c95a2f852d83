"""Sentry through the real server: a local stand-in receives the envelopes of forced 5xx
and of an unhandled error, tagged with actor and trace ids, with no prompt or secret inside."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from fakes.processes import wait_until
from fakes.sentry import FakeSentry
from handlers.base import BaseHandler
from tests.conftest import ANTHROPIC_KEY, TOKEN_A, actor
from tests.support.observed_fixtures import observed_gateway  # noqa: F401  (fixture)
from tests.support.observed_gateway import InProcessGateway

MODEL = "claude-3-haiku-20240307"
ROUTE = "/v1/completions/anthropic-messages"
PROMPT = "SECRET-PROMPT-7f3a please summarise my private notes"


class ExplodingHandler(BaseHandler):
    """A route that fails the way a bug would: an unexpected exception quoting its input."""

    route_class = "test"

    async def post(self) -> None:
        await self.authenticate()
        raise RuntimeError(f"unexpected failure with {TOKEN_A} while handling {self.request.body[:0]!r}")


@pytest.fixture
def fake_sentry() -> Iterator[FakeSentry]:
    fake = FakeSentry()
    yield fake
    fake.stop()


@pytest.fixture
def gw(observed_gateway: Callable[..., InProcessGateway], fake_sentry: FakeSentry) -> InProcessGateway:
    return observed_gateway(
        [actor("actor-a", TOKEN_A)],
        env={"CODY_GATEWAY_SENTRY_DSN": fake_sentry.dsn},
        extra_routes=[(r"/test/explode", ExplodingHandler, {})],
    )


def post(gw: InProcessGateway, text: str, path: str = ROUTE) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": text}]}
    response = httpx.post(
        gw.base_url + path,
        content=json.dumps(body),
        headers={"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions", "Content-Type": "application/json"},
        timeout=30,
    )
    gw.settle()
    return response


def flush(gw: InProcessGateway) -> None:
    import sentry_sdk

    sentry_sdk.flush(timeout=5)


def assert_clean(fake: FakeSentry) -> None:
    everything = b"".join(fake.envelopes).decode("utf-8", "replace")
    for secret in ("SECRET-PROMPT-7f3a", "private notes", TOKEN_A, ANTHROPIC_KEY, "Authorization"):
        assert secret not in everything, secret


def test_a_forced_5xx_reaches_sentry_tagged_and_without_the_prompt(gw: InProcessGateway, fake_sentry: FakeSentry) -> None:
    response = post(gw, PROMPT + " fake:status=500")
    assert response.status_code == 500
    flush(gw)
    events = fake_sentry.wait_for_events(1)
    assert len(events) == 1, events
    event = events[0]
    tags = event["tags"]
    assert tags["actor_id"] == "actor-a" and tags["trace_id"] == response.headers["X-Trace"]
    assert tags["span_id"] == response.headers["X-Trace-Span"]
    assert tags["status"] == "500" and tags["provider"] == "anthropic" and tags["route"] == "completions"
    assert tags["model"] == f"anthropic/{MODEL}"
    assert "HTTP 500" in event["message"] or "HTTP 500" in json.dumps(event.get("logentry", {}))
    # The error logged while serving it rides along instead of making a second event.
    assert any("returned 500" in line for line in event["extra"]["error_logs"])
    assert "request" not in event
    assert_clean(fake_sentry)


def test_an_unhandled_error_is_reported_once_with_the_request_tags(gw: InProcessGateway, fake_sentry: FakeSentry) -> None:
    response = post(gw, PROMPT, path="/test/explode")
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}
    flush(gw)
    events = fake_sentry.wait_for_events(1)
    assert len(events) == 1, events
    event = events[0]
    assert event["tags"]["actor_id"] == "actor-a"
    assert event["tags"]["trace_id"] == response.headers["X-Trace"]
    exception = event["exception"]["values"][-1]
    assert exception["type"] == "RuntimeError"
    assert "[REDACTED]" in exception["value"]
    for frame in exception["stacktrace"]["frames"]:
        assert "vars" not in frame
    assert_clean(fake_sentry)


def test_successes_and_client_errors_send_nothing(gw: InProcessGateway, fake_sentry: FakeSentry) -> None:
    assert post(gw, "hello").status_code == 200
    assert post(gw, "hello", path=ROUTE).status_code == 200
    bad = httpx.post(gw.base_url + ROUTE, content=b"{", headers={"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"}, timeout=10)
    assert bad.status_code == 400
    flush(gw)
    assert fake_sentry.events() == []


def test_a_5xx_storm_is_rate_limited(gw: InProcessGateway, fake_sentry: FakeSentry) -> None:
    reporter = gw.observability.sentry
    assert reporter is not None
    reporter.limit.capacity = 3.0
    reporter.limit.rate = 0.0
    for _ in range(6):
        assert post(gw, "fail fake:status=503 fake:retry_after=30").status_code == 503
    # The last request's hook may still be running after its response arrived.
    wait_until(lambda: reporter.limit.suppressed == 3, what="3 suppressed reports")
    flush(gw)
    assert len(fake_sentry.wait_for_events(3)) == 3
