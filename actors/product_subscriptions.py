"""The ``product-subscriptions`` source: ``slk_``/``sgs_`` tokens of enterprise subscriptions.

Configured as ``product-subscriptions``; its actors' source (events, metrics)
is the reference's ``dotcom-product-subscriptions``.

Backed by the GraphQL operations ``CheckAccessToken`` (one token) and
``ListProductSubscriptions`` (all of them, for the periodic sync), cached
in Redis under ``v2:product-subscriptions:v2:<slk_ token>``. A cached actor
is re-fetched when older than 24 hours; the sync keeps every active token
fresh and removes tokens that no longer exist. When the API cannot be
reached, cached actors keep serving.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from actors.base import (
    InvalidTokenFormat,
    SourceUnavailable,
    TokenDenied,
)
from actors.graphql import GraphQLError, GraphQLResponseError
from actors.graphql_source import (
    ACCESS_FIELDS,
    GRAPHQL_LIMIT_FIELDS,
    NEGATIVE_TTL_S,
    CachedGraphQLSource,
    CorruptEntry,
    changed_features,
    decode_actor,
    encode_actor,
    graphql_rate_limit,
    reset_features,
)
from actors.model import Actor, RateLimit
from actors.redis_cache import (
    SUBSCRIPTIONS_NAMESPACE,
    is_token_key,
    token_key,
)
from actors.tokens import (
    SUBSCRIPTION_PREFIX,
    check_token_format,
    normalise_subscription_token,
    token_sha256,
)

log = logging.getLogger("gateway.actors.product_subscriptions")

# The actor's source, as events, metrics, notifications and the attribution check see it:
# the reference's name (its BigQuery queries select on it).
SOURCE_NAME = "dotcom-product-subscriptions"
# The source's name in the configuration (``actors.sources``), in the sync report and in
# error messages: operators' config keeps working.
CONFIG_NAME = "product-subscriptions"
CHECK_OPERATION = "CheckAccessToken"
LIST_OPERATION = "ListProductSubscriptions"
NOT_FOUND_CODE = "ErrProductSubscriptionNotFound"
DENIED_REASON = "associated product subscription not found"
REFRESH_AFTER_S = 24 * 3600.0
ATTRIBUTION_PATH = "/v1/attribution"

_STATE_FIELDS = (
    "id uuid account { username } isArchived " + ACCESS_FIELDS + " activeLicense { info { tags } }"
)
CHECK_QUERY = (
    "query CheckAccessToken($token: String!) { dotcom {"
    " productSubscriptionByAccessToken(accessToken: $token) { " + _STATE_FIELDS + " } } }"
)
LIST_QUERY = (
    "query ListProductSubscriptions { dotcom { productSubscriptions {"
    " totalCount pageInfo { endCursor hasNextPage }"
    " nodes { " + _STATE_FIELDS + " sourcegraphAccessTokens } } } }"
)


def subscription_account_name(state: Mapping[str, Any]) -> str:
    """A ``customer:<name>`` license tag, else the account's username, else ""."""
    license_ = state.get("activeLicense")
    info = license_.get("info") if isinstance(license_, Mapping) else None
    tags = info.get("tags") if isinstance(info, Mapping) else None
    for tag in tags or ():
        if isinstance(tag, str) and tag.startswith("customer:"):
            return tag[len("customer:"):]
    account = state.get("account")
    if isinstance(account, Mapping) and account.get("username"):
        return str(account["username"])
    return ""


def build_subscription_actor(
    token: str,
    state: Mapping[str, Any] | None,
    *,
    now: float,
    percentage: float,
    concurrency_interval_s: float,
) -> Actor:
    state = state or {}
    uuid = str(state.get("uuid") or "")
    if uuid.startswith("es_"):
        uuid = uuid[3:]
    archived = bool(state.get("isArchived"))
    access = state.get("codyGatewayAccess")
    access = access if isinstance(access, Mapping) else {}
    rate_limits: dict[str, RateLimit] = {}
    for feature, field_name in GRAPHQL_LIMIT_FIELDS.items():
        # Every model the gateway allows (the reference ignores the API's list here).
        limit = graphql_rate_limit(
            access.get(field_name),
            allowed_models=("*",),
            percentage=percentage,
            concurrency_interval_s=concurrency_interval_s,
        )
        if limit is not None and limit.interval_s > 0:
            rate_limits[feature] = limit
    return Actor(
        id=uuid,
        name=subscription_account_name(state) or uuid,
        source=SOURCE_NAME,
        access_enabled=bool(uuid) and not archived and bool(access.get("enabled")),
        # Attribution stays available to bring-your-own-key customers whose
        # Cody Gateway access is off; an archived subscription loses it too.
        endpoint_access={ATTRIBUTION_PATH: bool(uuid) and not archived},
        rate_limits=rate_limits,
        last_updated=now,
        key=token_sha256(token),
    )


class ProductSubscriptionSource(CachedGraphQLSource):
    name = CONFIG_NAME
    actor_source = SOURCE_NAME
    refresh_after_s = REFRESH_AFTER_S

    namespace = SUBSCRIPTIONS_NAMESPACE
    token_prefix = SUBSCRIPTION_PREFIX
    cooldown_setting = "subscription_actor_cooldown"
    # Tokens the last sync dropped from the cache.
    last_sync_pruned = 0

    def normalise_token(self, token: str) -> str:
        return normalise_subscription_token(token)

    async def sync(self) -> int:
        """Cache an actor for every token of every subscription, then drop tokens not seen."""
        try:
            data = await self._graphql.query(LIST_OPERATION, LIST_QUERY)
        except GraphQLError as exc:
            raise SourceUnavailable(f"failed to list subscriptions: {exc}") from exc
        dotcom = data.get("dotcom")
        listing = dotcom.get("productSubscriptions") if isinstance(dotcom, Mapping) else None
        if not isinstance(listing, Mapping) or not isinstance(listing.get("nodes"), list):
            raise SourceUnavailable("failed to list subscriptions: response has no productSubscriptions.nodes")
        page_info = listing.get("pageInfo")
        if isinstance(page_info, Mapping) and page_info.get("hasNextPage"):
            log.warning("ListProductSubscriptions reports more pages; only the first is synced")
        now = self._clock()
        fresh: dict[str, Actor] = {}
        malformed = 0
        for node in listing["nodes"]:
            if not isinstance(node, Mapping):
                continue
            for raw_token in node.get("sourcegraphAccessTokens") or ():
                token = normalise_subscription_token(str(raw_token))
                if not _is_subscription_token(token):
                    malformed += 1
                    continue
                fresh[token] = self._build(token, node, now)
        if malformed:
            log.warning("sync skipped %d malformed subscription tokens", malformed)
        await self._reset_changed(fresh)
        await self._cache.set_many({token_key(token): encode_actor(actor) for token, actor in fresh.items()})
        self.last_sync_pruned = await self._prune({token_key(token) for token in fresh})
        log.info("synced %d subscription tokens, pruned %d", len(fresh), self.last_sync_pruned)
        return len(fresh)

    def _build(self, token: str, state: Mapping[str, Any] | None, now: float) -> Actor:
        return build_subscription_actor(
            token,
            state,
            now=now,
            percentage=self._config.concurrency_limit_percentage,
            concurrency_interval_s=self._config.concurrency_limit_interval,
        )

    async def _answer_from_cache(self, cached: Actor) -> Actor:
        if cached.is_empty():
            # The negative entry written when the API said "not found".
            raise TokenDenied(DENIED_REASON)
        return cached.with_updates(source=SOURCE_NAME)

    async def _fetch_and_cache(self, token: str, old: Actor | None) -> Actor:
        try:
            data = await self._graphql.query(CHECK_OPERATION, CHECK_QUERY, {"token": token})
        except GraphQLResponseError as exc:
            if exc.has_code(NOT_FOUND_CODE):
                await self._cache_negative(token)
                raise TokenDenied(DENIED_REASON) from exc
            raise SourceUnavailable(f"cannot validate access token right now: {exc}") from exc
        except GraphQLError as exc:
            raise SourceUnavailable(f"cannot validate access token right now: {exc}") from exc
        dotcom = data.get("dotcom")
        state = dotcom.get("productSubscriptionByAccessToken") if isinstance(dotcom, Mapping) else None
        if not isinstance(state, Mapping):
            await self._cache_negative(token)
            raise TokenDenied(DENIED_REASON)
        actor = self._build(token, state, self._clock())
        if actor.is_empty():
            await self._cache_negative(token)
            raise TokenDenied(DENIED_REASON)
        await reset_features(self._reset_usage, actor.id, changed_features(old, actor, reset_without_old=False))
        await self._cache.set(token_key(token), encode_actor(actor))
        return actor

    async def _cache_negative(self, token: str) -> None:
        await self._cache.set(token_key(token), encode_actor(self._build(token, None, self._clock())), ttl_s=NEGATIVE_TTL_S)

    async def _reset_changed(self, fresh: Mapping[str, Actor]) -> None:
        """Forget usage of subscriptions whose limits changed since their tokens were cached."""
        if self._reset_usage is None or not fresh:
            return
        tokens = list(fresh)
        previous = await self._cache.get_many([token_key(token) for token in tokens])
        done: set[tuple[str, str]] = set()
        for token, raw in zip(tokens, previous):
            if raw is None:
                continue
            try:
                old = decode_actor(raw)
            except CorruptEntry:
                continue
            actor = fresh[token]
            features = [
                f for f in changed_features(old, actor, reset_without_old=False) if (actor.id, f) not in done
            ]
            done.update((actor.id, f) for f in features)
            await reset_features(self._reset_usage, actor.id, features)

    async def _prune(self, seen: set[str]) -> int:
        """Delete cached token entries the listing no longer has; leave other keys alone."""
        try:
            keys = await self._cache.full_keys()
        except Exception as exc:  # pruning is best effort
            log.error("cannot list cached subscription tokens to prune: %s", exc)
            return 0
        stale: list[str] = []
        for key in keys:
            parts = key.split(":")
            if len(parts) != 4:
                # Never log the key: it may contain a token.
                log.warning("skipping cache key with %d parts (expected 4)", len(parts))
                continue
            suffix = parts[3]
            if is_token_key(suffix) and suffix not in seen:
                stale.append(suffix)
        await self._cache.delete(*stale)
        return len(stale)


def _is_subscription_token(token: str) -> bool:
    if not token.startswith(SUBSCRIPTION_PREFIX):
        return False
    try:
        check_token_format(token)
    except InvalidTokenFormat:
        return False
    return True
