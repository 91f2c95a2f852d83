"""The ``dotcom-user`` source: ``sgd_`` tokens checked against the GraphQL API (reference 2.5).

Actors are cached under the token and under the user id (the id entry
holds the user's latest limits across all of their tokens). A cached actor
is re-fetched when it is older than 15 minutes; when the API cannot be
reached, the cached actor, however old, keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from typing import Any

from actors.base import (
    SourceUnavailable,
    TokenDenied,
)
from actors.graphql import GraphQLError, GraphQLResponseError
from actors.graphql_source import (
    ACCESS_FIELDS,
    GRAPHQL_LIMIT_FIELDS,
    NEGATIVE_TTL_S,
    CachedGraphQLSource,
    changed_features,
    encode_actor,
    graphql_rate_limit,
    reset_features,
)
from actors.model import FEATURES, Actor, RateLimit
from actors.redis_cache import (
    DOTCOM_USERS_NAMESPACE,
    token_key,
)
from actors.tokens import DOTCOM_USER_PREFIX, token_sha256

log = logging.getLogger("gateway.actors.dotcom_user")

SOURCE_NAME = "dotcom-user"
OPERATION = "CheckDotcomUserAccessToken"
NOT_FOUND_CODE = "ErrDotcomUserNotFound"
DENIED_REASON = "associated dotcom user not found"
REFRESH_AFTER_S = 15 * 60.0

QUERY = (
    "query CheckDotcomUserAccessToken($token: String!) { dotcom {"
    " codyGatewayDotcomUserByToken(token: $token) { id username "
    + ACCESS_FIELDS
    + " } } }"
)

_INT32 = (-(2**31), 2**31 - 1)


def decode_user_id(relay_id: str) -> str:
    """The decimal user id from a GraphQL relay id (base64 of ``User:<n>``); "" if invalid."""
    if not relay_id:
        return ""
    padded = relay_id + "=" * (-len(relay_id) % 4)
    for decode in (base64.urlsafe_b64decode, base64.standard_b64decode):
        try:
            text = decode(padded.encode("ascii")).decode("utf-8")
            break
        except (binascii.Error, ValueError, UnicodeError):
            continue
    else:
        return ""
    _, sep, spec = text.partition(":")
    if not sep:
        return ""
    try:
        value = json.loads(spec)
    except ValueError:
        return ""
    if not isinstance(value, int) or isinstance(value, bool) or not _INT32[0] <= value <= _INT32[1]:
        return ""
    return str(value)


def build_user_actor(
    token: str,
    user: Mapping[str, Any] | None,
    *,
    now: float,
    percentage: float,
    concurrency_interval_s: float,
) -> Actor:
    """The reference's newActor: every feature starts as a zero (invalid) limit."""
    user = user or {}
    user_id = decode_user_id(str(user.get("id") or ""))
    access = user.get("codyGatewayAccess")
    access = access if isinstance(access, Mapping) else {}
    empty = RateLimit(allowed_models=(), limit=0, interval_s=0)
    rate_limits: dict[str, RateLimit] = {feature: empty for feature in FEATURES}
    for feature, field_name in GRAPHQL_LIMIT_FIELDS.items():
        limit = graphql_rate_limit(
            access.get(field_name),
            allowed_models=None,
            percentage=percentage,
            concurrency_interval_s=concurrency_interval_s,
        )
        if limit is not None:
            rate_limits[feature] = limit
    return Actor(
        id=user_id,
        name=str(user.get("username") or ""),
        source=SOURCE_NAME,
        access_enabled=bool(user_id) and bool(access.get("enabled")),
        rate_limits=rate_limits,
        last_updated=now,
        key=token_sha256(token),
    )


class DotcomUserSource(CachedGraphQLSource):
    name = SOURCE_NAME
    refresh_after_s = REFRESH_AFTER_S
    namespace = DOTCOM_USERS_NAMESPACE
    token_prefix = DOTCOM_USER_PREFIX
    cooldown_setting = "dotcom_actor_cooldown"

    async def _answer_from_cache(self, cached: Actor) -> Actor:
        if cached.is_empty() and not cached.name:
            # The negative entry written when the API said "not found".
            raise TokenDenied(DENIED_REASON)
        actor = cached.with_updates(source=SOURCE_NAME)
        if not actor.id:
            return actor
        latest = await self._read(actor.id)
        if latest is not None and latest.rate_limits:
            actor = actor.with_updates(rate_limits=latest.rate_limits)
        return actor

    async def _fetch_and_cache(self, token: str, old: Actor | None) -> Actor:
        try:
            data = await self._graphql.query(OPERATION, QUERY, {"token": token})
        except GraphQLResponseError as exc:
            if exc.has_code(NOT_FOUND_CODE):
                await self._cache_negative(token)
                raise TokenDenied(DENIED_REASON) from exc
            raise SourceUnavailable(f"cannot validate access token right now: {exc}") from exc
        except GraphQLError as exc:
            raise SourceUnavailable(f"cannot validate access token right now: {exc}") from exc
        dotcom = data.get("dotcom")
        user = dotcom.get("codyGatewayDotcomUserByToken") if isinstance(dotcom, Mapping) else None
        if not isinstance(user, Mapping):
            await self._cache_negative(token)
            raise TokenDenied(DENIED_REASON)
        actor = build_user_actor(
            token,
            user,
            now=self._clock(),
            percentage=self._config.concurrency_limit_percentage,
            concurrency_interval_s=self._config.concurrency_limit_interval,
        )
        if actor.id:
            # The id entry is the freshest view of this user's limits across tokens.
            by_id = await self._read(actor.id)
            if by_id is not None and by_id.id == actor.id:
                old = by_id
        await reset_features(
            self._reset_usage, actor.id, changed_features(old, actor, reset_without_old=True)
        )
        encoded = encode_actor(actor)
        entries = {token_key(token): encoded}
        if actor.id:
            entries[actor.id] = encoded
        await self._cache.set_many(entries)
        return actor

    async def _cache_negative(self, token: str) -> None:
        """Remember "not found" briefly so a bad token does not hit the API on every request."""
        empty = build_user_actor(
            token, None, now=self._clock(), percentage=self._config.concurrency_limit_percentage,
            concurrency_interval_s=self._config.concurrency_limit_interval,
        )
        await self._cache.set(token_key(token), encode_actor(empty), ttl_s=NEGATIVE_TTL_S)
