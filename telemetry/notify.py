"""Quota usage notifications to Slack (reference section 7).

Thresholds are per actor source (``telemetry.notify_thresholds``, by default
``product-subscriptions: [90, 95, 100]``; other sources never notify). The
notifier is told the usage ratio after every successful request and 1.0 on
every quota rejection. A notification goes out when the usage crosses a
threshold bucket that has not fired in the current window:

1. nothing to do below the lowest threshold (checked in-line, no task);
2. lock ``rate_limit:<feature>:alert:lock:<actorId>`` (SET NX, 30 s), or
   give up: another request or process is already on it;
3. ``bucket`` = the highest threshold not above the usage percentage;
4. stop if ``rate_limit:<feature>:alert:<actorId>`` already holds a bucket
   at least as high; otherwise store the bucket there with the remaining
   window as TTL, so each bucket fires at most once per window;
5. post the reference's Slack message (or log it when no webhook is set).

Without Redis the lock and the last bucket live in this process. Nothing
here ever delays or fails a request: it runs as a background task, at most
``max_pending`` at once (more are dropped and logged).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from background import BackgroundTasks
from conf.durations import format_go_duration

log = logging.getLogger("gateway.notify")

LOCK_TTL_S = 30
SEND_TIMEOUT_S = 15.0
SUBSCRIPTION_SOURCES = frozenset({"product-subscriptions", "dotcom-product-subscriptions"})

RedisObserver = Callable[[str, float, str], None]


def lock_key(feature: str, actor_id: str) -> str:
    return f"rate_limit:{feature}:alert:lock:{actor_id}"


def bucket_key(feature: str, actor_id: str) -> str:
    return f"rate_limit:{feature}:alert:{actor_id}"


def highest_bucket(thresholds: tuple[int, ...], percent: int) -> int | None:
    """The highest threshold not above ``percent`` (thresholds sorted ascending)."""
    bucket = None
    for threshold in thresholds:
        if threshold <= percent:
            bucket = threshold
    return bucket


def slack_text(
    *, actor_id: str, actor_name: str, source: str, feature: str, percent: int, ttl_s: float,
    dotcom_origin: str, now: float | None = None,
) -> str:
    """The reference's message, in Slack mrkdwn."""
    if source in SUBSCRIPTION_SOURCES:
        link = f"<{dotcom_origin}/site-admin/dotcom/product/subscriptions/{actor_id}|{actor_name or actor_id}>"
    else:
        link = f"`{actor_id}`"
    reset_at = dt.datetime.fromtimestamp(int((time.time() if now is None else now) + ttl_s), tz=dt.UTC)
    return (
        f'The actor {link} from "{source}" has exceeded *{percent}%* of its rate limit quota for `{feature}`. '
        f"The quota will reset in `{format_go_duration(int(ttl_s))}` at `{reset_at.strftime('%Y-%m-%dT%H:%M:%SZ')}`."
    )


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "https://sourcegraph.com"


# The config names sources as ``actors.sources`` does; subscription actors carry
# the reference's source name (the one events and BigQuery queries use).
_ACTOR_SOURCE = {"product-subscriptions": "dotcom-product-subscriptions"}


class _LocalState:
    """The in-process twin of the two Redis keys."""

    def __init__(self) -> None:
        self.locks: set[str] = set()
        self.buckets: dict[str, tuple[int, float]] = {}

    def lock(self, key: str) -> bool:
        if key in self.locks:
            return False
        self.locks.add(key)
        return True

    def unlock(self, key: str) -> None:
        self.locks.discard(key)

    def last_bucket(self, key: str) -> int:
        entry = self.buckets.get(key)
        if entry is None or entry[1] <= time.monotonic():
            return 0
        return entry[0]

    def set_bucket(self, key: str, bucket: int, ttl_s: int) -> None:
        if len(self.buckets) > 100_000:
            now = time.monotonic()
            self.buckets = {k: v for k, v in self.buckets.items() if v[1] > now}
        self.buckets[key] = (bucket, time.monotonic() + ttl_s)


class QuotaNotifier:
    def __init__(
        self,
        *,
        thresholds: Mapping[str, tuple[int, ...]],
        webhook_url: str,
        dotcom_api_url: str,
        redis: Any | None = None,
        http_client: AsyncHTTPClient | None = None,
        on_redis_call: RedisObserver | None = None,
        on_outcome: Callable[[str], None] | None = None,
        max_pending: int = 100,
    ) -> None:
        self.thresholds = {
            _ACTOR_SOURCE.get(source, source): tuple(sorted(values)) for source, values in thresholds.items() if values
        }
        self.webhook_url = webhook_url
        self.dotcom_origin = origin_of(dotcom_api_url)
        self.redis = redis
        self.http_client = http_client
        self._on_redis_call = on_redis_call
        self._on_outcome = on_outcome
        self._local = _LocalState()
        self._max_pending = max_pending
        self._tasks = BackgroundTasks(log)
        self.dropped = 0

    def notify(self, actor: Any, feature: str, usage_ratio: float, ttl_s: float) -> None:
        """Consider a notification for ``actor``'s usage of ``feature``; never blocks, never raises."""
        thresholds = self.thresholds.get(actor.source)
        if not thresholds or not actor.id:
            return
        percent = int(usage_ratio * 100)
        if percent < thresholds[0]:
            return
        if len(self._tasks) >= self._max_pending:
            self.dropped += 1
            log.warning("quota notification dropped: %d already pending", len(self._tasks))
            return
        self._tasks.spawn(self._run(actor, feature, thresholds, percent, ttl_s), "quota notification")

    @property
    def pending(self) -> int:
        """Notifications still running."""
        return len(self._tasks)

    async def wait_idle(self, timeout_s: float = 20.0) -> None:
        """Let pending notifications finish (for shutdown)."""
        await self._tasks.wait(timeout_s)

    async def _run(self, actor: Any, feature: str, thresholds: tuple[int, ...], percent: int, ttl_s: float) -> None:
        bucket = highest_bucket(thresholds, percent)
        if bucket is None:
            return
        lock = lock_key(feature, actor.id)
        if not await self._lock(lock):
            return
        try:
            key = bucket_key(feature, actor.id)
            if bucket <= await self._last_bucket(key):
                return
            await self._set_bucket(key, bucket, max(1, math.ceil(ttl_s)))
        finally:
            await self._unlock(lock)
        text = slack_text(
            actor_id=actor.id, actor_name=getattr(actor, "name", ""), source=actor.source, feature=feature,
            percent=bucket, ttl_s=ttl_s, dotcom_origin=self.dotcom_origin,
        )
        await self._send(text)

    # -- the two keys, in Redis or here ---------------------------------------------

    async def _redis(self, command: str, call: Any) -> Any:
        started = time.monotonic()
        try:
            result = await call
        except Exception:
            self._observe(command, started, "error")
            raise
        self._observe(command, started, "ok")
        return result

    def _observe(self, command: str, started: float, outcome: str) -> None:
        if self._on_redis_call is not None:
            self._on_redis_call(command, time.monotonic() - started, outcome)

    async def _lock(self, key: str) -> bool:
        if self.redis is None:
            return self._local.lock(key)
        return bool(await self._redis("notify_lock", self.redis.set(key, "1", nx=True, ex=LOCK_TTL_S)))

    async def _unlock(self, key: str) -> None:
        if self.redis is None:
            self._local.unlock(key)
            return
        try:
            await self._redis("notify_unlock", self.redis.delete(key))
        except Exception as exc:  # the lock expires on its own
            log.warning("could not release the notification lock: %s", type(exc).__name__)

    async def _last_bucket(self, key: str) -> int:
        if self.redis is None:
            return self._local.last_bucket(key)
        raw = await self._redis("notify_get", self.redis.get(key))
        try:
            return int(raw) if raw is not None else 0
        except ValueError:
            return 0

    async def _set_bucket(self, key: str, bucket: int, ttl_s: int) -> None:
        if self.redis is None:
            self._local.set_bucket(key, bucket, ttl_s)
            return
        # SET with EX is SETEX, which redis-py deprecates.
        await self._redis("notify_set", self.redis.set(key, bucket, ex=ttl_s))

    # -- Slack ------------------------------------------------------------------------

    async def _send(self, text: str) -> None:
        if not self.webhook_url:
            log.debug("quota notification (no Slack webhook configured): %s", text)
            self._outcome("logged")
            return
        client = self.http_client or AsyncHTTPClient()
        body = orjson.dumps({"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]})
        request = HTTPRequest(
            self.webhook_url, method="POST", body=body, headers={"Content-Type": "application/json"},
            request_timeout=SEND_TIMEOUT_S, connect_timeout=SEND_TIMEOUT_S,
        )
        try:
            await client.fetch(request)
        except (HTTPClientError, OSError) as exc:
            # The webhook URL is a secret: name the failure, not the URL.
            log.error("quota notification to Slack failed: %s", getattr(exc, "code", type(exc).__name__))
            self._outcome("failed")
            return
        self._outcome("sent")

    def _outcome(self, outcome: str) -> None:
        if self._on_outcome is not None:
            self._on_outcome(outcome)
