"""Admission glue shared by the completions and embeddings handlers.

Turns a limiter Decision into the reference's 429 (message, headers), pairs
every admission with exactly one release, and runs the reference's
update-on-error actor refresh in the background.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time

from tornado.httputil import HTTPHeaders

from actors.base import ActorRecentlyUpdated
from actors.model import CHAT_COMPLETIONS, COMPLETION_FEATURES, Actor, RateLimit
from background import BackgroundTasks
from errors import BadRequest, Forbidden, RateLimited, ServiceUnavailable
from handlers.services import Services
from limiter.base import CONCURRENCY, TOKENS, Decision, LimiterUnavailable, LimitRule

log = logging.getLogger("gateway.admission")


def completion_feature(headers: HTTPHeaders, *, required: bool) -> str:
    """``X-Sourcegraph-Feature`` of a completion-family request; the SDK routes default to chat."""
    raw = headers.get("X-Sourcegraph-Feature")
    if raw is None or not raw.strip():
        if required:
            raise BadRequest("X-Sourcegraph-Feature header is required")
        return CHAT_COMPLETIONS
    feature = raw.strip()
    if feature not in COMPLETION_FEATURES:
        raise BadRequest("invalid value for X-Sourcegraph-Feature")
    return feature


def limit_for_feature(services: Services, actor: Actor, token: str, feature: str) -> RateLimit:
    """The actor's limit for ``feature``; 403 without one (and its actor refreshed in the background)."""
    rate_limit = actor.limit_for(feature)
    if rate_limit is None:
        refresh_in_background(services, actor, token)
        raise Forbidden(f"no access to feature {feature}")
    return rate_limit


def go_time(ts: float) -> str:
    """Go's default time format, which the reference's 429 messages use."""
    return dt.datetime.fromtimestamp(int(ts), tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(max(0, decision.remaining)),
        "X-RateLimit-Reset": str(max(0, math.ceil(decision.reset_s))),
    }


def rejection(decision: Decision, feature: str) -> RateLimited:
    retry_after = max(1, math.ceil(decision.retry_after_s))
    retry_at = go_time(time.time() + retry_after)
    if decision.cause == CONCURRENCY:
        message = (
            f'you have exceeded the concurrency limit of {decision.limit} requests for "{feature}". '
            f"Retry after {retry_at}"
        )
    elif decision.cause == TOKENS:
        message = f'you have exceeded the token limit of {decision.limit} tokens for "{feature}". Retry after {retry_at}'
    else:
        message = f"you have exceeded the rate limit of {decision.limit} requests. Retry after {retry_at}"
    headers = rate_limit_headers(decision)
    headers["Retry-After"] = str(retry_after)
    return RateLimited(message, headers=headers)


class LimitedRequest:
    """Shared by completions and embeddings: admission and the matching release.

    A concurrency lease lives ``upstream.lease_ttl_s`` at most (a process that
    dies frees its slots within that time); the services' ``LeaseKeeper``
    renews it while the request runs, so that a lease never expires under a
    live request however long its deadline.
    """

    __slots__ = ("services", "rule", "decision", "renewed_at")

    def __init__(self, services: Services) -> None:
        self.services = services
        self.rule: LimitRule | None = None
        self.decision: Decision | None = None
        self.renewed_at = 0.0

    def make_rule(self, actor_id: str, feature: str, rate_limit: RateLimit, *, timeout_s: float) -> LimitRule:
        upstream = self.services.config.upstream
        return LimitRule(
            bucket=actor_id,
            feature=feature,
            limit=rate_limit.limit,
            interval_s=rate_limit.interval_s,
            concurrency=rate_limit.concurrent_requests or 0,
            lease_ttl_s=min(timeout_s + upstream.lease_grace_s, upstream.lease_ttl_s),
            tokens_limit=rate_limit.tokens_limit,
        )

    async def acquire(self, rule: LimitRule, *, cost: int = 1, token_reserve: int = 0) -> Decision:
        try:
            decision = await self.services.limiter.acquire(rule, cost=cost, token_reserve=token_reserve)
        except LimiterUnavailable as exc:
            raise ServiceUnavailable("rate limiter unavailable, please retry", headers={"Retry-After": "1"}) from exc
        if decision.allowed:
            self.rule, self.decision = rule, decision
            if rule.concurrency > 0:
                self.services.leases.hold(self)
        return decision

    def release(self, *, refund: bool, actual_cost: int | None = None, actual_tokens: int | None = None) -> None:
        rule, decision = self.rule, self.decision
        if rule is None or decision is None:
            return
        self.rule = self.decision = None
        if rule.concurrency > 0:
            self.services.leases.drop(self)
        spawn(
            self.services.limiter.release(
                rule, decision, refund=refund, actual_cost=actual_cost, actual_tokens=actual_tokens
            ),
            "limiter release",
        )


_background = BackgroundTasks(log)
spawn = _background.spawn


def refresh_in_background(services: Services, actor: Actor, token: str) -> None:
    """Update-on-error (reference 2.7): a refused actor may have a new plan; re-fetch it,
    without making the refused request wait. Cooldowns keep this cheap."""

    async def refresh() -> None:
        try:
            await services.actors.refresh(actor, token)
        except ActorRecentlyUpdated:
            pass
        except Exception as exc:  # a failed refresh only matters for the next request
            log.warning("update-on-error refresh of actor %s failed: %s", actor.id, exc)

    spawn(refresh(), "actor refresh")

