"""Snippet attribution search through the GraphQL API (reference 1.6).

The handler checks who may call it; this module only clamps the limit,
runs ``SnippetAttribution`` and shapes the reference's response (note the
capitalised ``Repositories`` key, and ``totalCount``/``limitHit`` omitted
when zero/false).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from actors.graphql import GraphQLClient, GraphQLError
from errors import ServiceUnavailable, UpstreamError

OPERATION = "SnippetAttribution"
LIMIT_UPPER_BOUND = 4
QUERY = (
    "query SnippetAttribution($snippet: String!, $limit: Int!) {"
    " snippetAttribution(snippet: $snippet, limit: $limit) {"
    " totalCount limitHit nodes { repositoryName } } }"
)


def clamp_limit(limit: int) -> int:
    """0, negative or above the bound all mean the bound."""
    return LIMIT_UPPER_BOUND if limit <= 0 or limit > LIMIT_UPPER_BOUND else limit


def response_body(result: Mapping[str, Any]) -> dict[str, Any]:
    """The reference's JSON from a ``snippetAttribution`` object."""
    nodes = result.get("nodes") or []
    repositories = [
        {"name": str(node.get("repositoryName") or "")} for node in nodes if isinstance(node, Mapping)
    ]
    body: dict[str, Any] = {"Repositories": repositories or None}
    total = int(result.get("totalCount") or 0)
    if total:
        body["totalCount"] = total
    if result.get("limitHit"):
        body["limitHit"] = True
    return body


class AttributionSearch:
    def __init__(self, graphql: GraphQLClient | None, *, enabled: bool) -> None:
        self._graphql = graphql
        self._enabled = enabled and graphql is not None

    @property
    def enabled(self) -> bool:
        return self._enabled

    def check_enabled(self) -> None:
        if not self._enabled:
            raise ServiceUnavailable("attribution search not enabled")

    async def search(self, snippet: str, limit: int) -> dict[str, Any]:
        self.check_enabled()
        assert self._graphql is not None
        try:
            data = await self._graphql.query(OPERATION, QUERY, {"snippet": snippet, "limit": clamp_limit(limit)})
        except GraphQLError as exc:
            raise UpstreamError(f"fetching SnippetAttribution from sourcegraph.com: {exc}") from exc
        result = data.get("snippetAttribution")
        if not isinstance(result, Mapping):
            raise UpstreamError("fetching SnippetAttribution from sourcegraph.com: response has no snippetAttribution")
        return response_body(result)
