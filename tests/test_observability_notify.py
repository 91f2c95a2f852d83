"""Quota usage notifications through the real server: a local stand-in for Slack receives
exactly one message per threshold crossing, deduplicated per window (Redis or in-process)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from fakes.processes import wait_until
from fakes.slack import FakeSlack
from telemetry.notify import highest_bucket, slack_text
from tests.conftest import TOKEN_A, TOKEN_B, actor, limits
from tests.support.observed_fixtures import observed_gateway  # noqa: F401  (fixture)
from tests.support.observed_gateway import InProcessGateway

MODEL = "claude-3-haiku-20240307"
ROUTE = "/v1/completions/anthropic-messages"
THRESHOLDS = {"static": [50, 80, 100]}


def post(gw: InProcessGateway, token: str = TOKEN_A) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "hi fake:tokens=2"}]}
    return httpx.post(
        gw.base_url + ROUTE,
        content=json.dumps(body),
        headers={"Authorization": f"Bearer {token}", "X-Sourcegraph-Feature": "chat_completions", "Content-Type": "application/json"},
        timeout=30,
    )


@pytest.fixture
def fake_slack() -> Iterator[FakeSlack]:
    fake = FakeSlack()
    yield fake
    fake.stop()


def start(observed_gateway: Callable[..., InProcessGateway], fake_slack: FakeSlack, **kwargs: Any) -> InProcessGateway:
    return observed_gateway(
        [
            actor("actor-a", TOKEN_A, chat_completions=limits(limit=10, interval="1h")),
            actor("actor-b", TOKEN_B, chat_completions=limits(limit=10, interval="1h")),
        ],
        env={"CODY_GATEWAY_ACTOR_RATE_LIMIT_NOTIFY_SLACK_WEBHOOK_URL": fake_slack.url},
        overrides={"telemetry.notify_thresholds": THRESHOLDS},
        **kwargs,
    )


def settle(gw: InProcessGateway) -> None:
    notifier = gw.observability.notifier
    assert notifier is not None
    # Asked on the loop thread: the hook that starts a notification runs there
    # just after the response is written.
    wait_until(lambda: gw.call(lambda: notifier.pending == 0), what="notifications to finish")


def run_to_the_limit(gw: InProcessGateway, fake_slack: FakeSlack, token: str = TOKEN_A) -> list[int]:
    """Use the whole quota one request at a time; the number of messages after each request."""
    counts = []
    for _ in range(10):
        assert post(gw, token).status_code == 200
        settle(gw)
        counts.append(len(fake_slack.messages))
    assert post(gw, token).status_code == 429
    assert post(gw, token).status_code == 429
    settle(gw)
    counts.append(len(fake_slack.messages))
    return counts


def assert_messages(texts: list[str], actor_id: str) -> None:
    assert [int(re.search(r"\*(\d+)%\*", t).group(1)) for t in texts] == [50, 80, 100]  # type: ignore[union-attr]
    for text in texts:
        assert f"`{actor_id}`" in text and 'from "static"' in text and "`chat_completions`" in text
        assert re.search(r"The quota will reset in `(\d+h)?\d+m\d+s` at `\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ`\.", text), text


def test_one_message_per_threshold_crossing_in_process(observed_gateway: Callable[..., InProcessGateway], fake_slack: FakeSlack) -> None:
    gw = start(observed_gateway, fake_slack)
    counts = run_to_the_limit(gw, fake_slack)
    # 5/10 crosses 50 %, 8/10 crosses 80 %, 10/10 crosses 100 %; the 429s repeat 100 % and stay quiet.
    assert counts == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert_messages(fake_slack.texts(), "actor-a")
    message = fake_slack.messages[0]
    assert message["content_type"] == "application/json"
    assert message["json"]["blocks"][0]["type"] == "section"
    assert message["json"]["blocks"][0]["text"]["type"] == "mrkdwn"
    samples = httpx.get(gw.base_url + "/metrics", timeout=10).text
    assert 'cody_gateway_quota_notifications_total{outcome="sent"} 3.0' in samples


def test_one_message_per_threshold_crossing_with_redis(observed_gateway: Callable[..., InProcessGateway], fake_slack: FakeSlack, redis_server: Any) -> None:
    gw = start(observed_gateway, fake_slack, notify_redis_url=redis_server.url)
    counts = run_to_the_limit(gw, fake_slack, token=TOKEN_B)
    assert counts == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert_messages(fake_slack.texts(), "actor-b")
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.get("rate_limit:chat_completions:alert:actor-b") == b"100"
        assert 0 < client.ttl("rate_limit:chat_completions:alert:actor-b") <= 3600
        assert client.get("rate_limit:chat_completions:alert:lock:actor-b") is None
    finally:
        client.close()
    samples = httpx.get(gw.base_url + "/metrics", timeout=10).text
    assert 'cody_gateway_redis_command_duration_seconds_count{command="notify_lock",outcome="ok"}' in samples


def test_sources_without_thresholds_never_notify(observed_gateway: Callable[..., InProcessGateway], fake_slack: FakeSlack) -> None:
    gw = observed_gateway(
        [actor("actor-a", TOKEN_A, chat_completions=limits(limit=2, interval="1h"))],
        env={"CODY_GATEWAY_ACTOR_RATE_LIMIT_NOTIFY_SLACK_WEBHOOK_URL": fake_slack.url},
    )
    for _ in range(2):
        assert post(gw).status_code == 200
    assert post(gw).status_code == 429
    assert gw.observability.notifier is not None  # product-subscriptions has thresholds by default
    settle(gw)
    assert fake_slack.messages == []


def test_highest_bucket_and_message_shape() -> None:
    assert highest_bucket((50, 80, 90), 10) is None
    assert highest_bucket((50, 80, 90), 50) == 50
    assert highest_bucket((50, 80, 90), 89) == 80
    assert highest_bucket((90, 95, 100), 100) == 100
    text = slack_text(
        actor_id="d3d2", actor_name="Acme", source="product-subscriptions", feature="chat_completions",
        percent=95, ttl_s=3599, dotcom_origin="https://sourcegraph.com", now=0,
    )
    assert text == (
        'The actor <https://sourcegraph.com/site-admin/dotcom/product/subscriptions/d3d2|Acme> from "product-subscriptions" '
        "has exceeded *95%* of its rate limit quota for `chat_completions`. "
        "The quota will reset in `59m59s` at `1970-01-01T00:59:59Z`."
    )
