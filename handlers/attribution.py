"""POST /v1/attribution: snippet attribution search for enterprise subscriptions (reference 1.6).

Not rate-limited and without usage events, as in the reference. Reachable
with ``accessEnabled=false`` when the actor's ``endpointAccess`` grants
``/v1/attribution`` (bring-your-own-key subscriptions).
"""

from __future__ import annotations

from typing import Any

import orjson

from actors.attribution import AttributionSearch
from actors.product_subscriptions import SOURCE_NAME as SUBSCRIPTIONS_SOURCE
from errors import BadRequest, Unauthorized
from handlers.base import BodyHandler
from handlers.services import Services


def parse_request(body: bytes) -> tuple[str, int]:
    """``snippet`` and ``limit`` from the JSON body; keys match case-insensitively, as Go's decoder does."""
    if not body.strip():
        raise BadRequest("EOF")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    fields = {str(k).lower(): v for k, v in data.items()}
    snippet = fields.get("snippet", "")
    limit = fields.get("limit", 0)
    if snippet is None:
        snippet = ""
    if limit is None:
        limit = 0
    if not isinstance(snippet, str):
        raise BadRequest("snippet must be a string")
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise BadRequest("limit must be an integer")
    return snippet, limit


class AttributionHandler(BodyHandler):
    route_class = "attribution"
    operation = "attribution"

    def initialize(self, services: Services, attribution: AttributionSearch, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(services, **kwargs)
        self.attribution = attribution

    async def prepare(self) -> None:
        await super().prepare()
        actor = self.actor
        assert actor is not None
        if actor.source != SUBSCRIPTIONS_SOURCE:
            raise Unauthorized("only available for enterprise product subscriptions")
        self.attribution.check_enabled()

    async def post(self) -> None:
        snippet, limit = parse_request(self.body())
        self.write_json(200, await self.attribution.search(snippet, limit))
