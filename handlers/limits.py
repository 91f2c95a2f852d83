"""GET /v1/limits (the caller's quotas) and POST /v1/limits/refresh (re-fetch the actor)."""

from __future__ import annotations

import math
import time
from typing import Any

from actors.base import ActorRecentlyUpdated, SourceError
from actors.model import FEATURES
from conf.durations import format_go_duration
from errors import RateLimited, ServiceUnavailable
from handlers.admission import LimitedRequest
from handlers.base import BaseHandler, rfc3339


class LimitsHandler(BaseHandler):
    route_class = "limits"
    operation = "v1.limits"

    async def prepare(self) -> None:
        self.start_span()
        await self.authenticate()

    async def get(self) -> None:
        actor = self.actor
        assert actor is not None
        timeout_s = self.services.config.upstream.max_timeout_ms / 1000
        limited = LimitedRequest(self.services)
        out: dict[str, Any] = {}
        for feature in FEATURES:
            rate_limit = actor.limit_for(feature)
            if rate_limit is None:
                continue
            rule = limited.make_rule(actor.id, feature, rate_limit, timeout_s=timeout_s)
            status = await self.services.limiter.status(rule)
            entry: dict[str, Any] = {
                "limit": rate_limit.limit,
                "interval": format_go_duration(rate_limit.interval_s),
                "usage": status.used,
                "remaining": status.remaining,
                "allowedModels": list(rate_limit.allowed_models),
            }
            if status.used > 0:
                entry["expiry"] = rfc3339(time.time() + math.ceil(status.reset_s))
            if rate_limit.concurrent_requests:
                entry["concurrentRequests"] = rate_limit.concurrent_requests
                entry["inFlight"] = status.in_flight
            if rate_limit.tokens_limit is not None:
                entry["tokensLimit"] = rate_limit.tokens_limit
                entry["tokensRemaining"] = status.tokens_remaining
            out[feature] = entry
        self.write_json(200, out)


class LimitsRefreshHandler(BaseHandler):
    route_class = "limits"
    operation = "v1.limits"

    async def prepare(self) -> None:
        self.start_span()
        await self.authenticate()

    async def post(self) -> None:
        actor = self.actor
        assert actor is not None
        try:
            await self.services.actors.refresh(actor, self.token)
        except ActorRecentlyUpdated as exc:
            raise RateLimited(str(exc), headers={"Retry-After": str(max(1, math.ceil(exc.retry_in_s)))}) from exc
        except SourceError as exc:
            raise ServiceUnavailable(f"{actor.source}: {exc}") from exc
        self.set_status(200)
        self.finish()
