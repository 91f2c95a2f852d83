"""The GraphQL-backed actor sources against a real local GraphQL server and a real redis-server.

Each scenario runs in its own event loop (``run``). Sources are exercised
directly and through actors.chain.SourceChain; the cache backend is the
real Redis, and where the semantics must match, the in-process dict too.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from tornado.curl_httpclient import CurlAsyncHTTPClient

from actors.anonymous import AnonymousSource
from actors.attribution import AttributionSearch, clamp_limit
from actors.base import ActorRecentlyUpdated, InvalidTokenFormat, NotFromSource, TokenDenied
from actors.chain import SourceChain, TokenDeniedError
from actors.dotcom_user import DotcomUserSource, decode_user_id
from actors.graphql import GraphQLClient, GraphQLHTTPError, GraphQLResponseError, GraphQLUnavailable
from actors.model import Actor
from actors.product_subscriptions import ProductSubscriptionSource
from actors.redis_cache import MemoryActorCache, cache_prefix, token_key
from actors.sync_worker import LOCK_NAME, SyncWorker
from conf.model import ActorsConfig
from errors import ServiceUnavailable, Unauthorized, UpstreamError
from fakes.graphql import FakeGraphQL, Plan
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.timeout(60)

MODELS = ["anthropic/claude-2", "sourcegraph/codebot-9000"]


def token(prefix: str, name: str) -> str:
    return prefix + hashlib.sha256(name.encode()).hexdigest()


USER_TOKEN = token("sgd_", "alice")
USER_TOKEN_2 = token("sgd_", "alice-laptop")
UNKNOWN_USER = token("sgd_", "nobody")
SUB_TOKEN = token("slk_", "acme-license-1")
SUB_TOKEN_2 = token("slk_", "acme-license-2")
OTHER_SUB_TOKEN = token("slk_", "globex-license")
UNKNOWN_SUB = token("slk_", "nobody")


def make_config(**overrides: Any) -> ActorsConfig:
    base = ActorsConfig(
        sources=("anonymous", "static", "dotcom-user", "product-subscriptions"),
        allow_anonymous=False,
        static_file="",
        static_file_optional=False,
        concurrency_limit_percentage=50,
        concurrency_limit_interval=10.0,
        local_cache_ttl=10.0,
        sources_sync_interval=120.0,
        sources_cache_ttl=86400.0,
        dotcom_api_url="",
        dotcom_access_token="",
        dotcom_client_id="",
        dotcom_actor_cooldown=300.0,
        subscription_actor_cooldown=600.0,
        identifiers_to_log_for=(),
        attribution_enabled=True,
    )
    return replace(base, **overrides)


class Clock:
    """Wall time that the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Env:
    fake: FakeGraphQL
    graphql: GraphQLClient
    clock: Clock
    config: ActorsConfig
    redis: Any  # redis.asyncio.Redis or None
    resets: list[tuple[str, str]] = field(default_factory=list)
    http: CurlAsyncHTTPClient | None = None

    async def reset_usage(self, actor_id: str, feature: str) -> None:
        self.resets.append((actor_id, feature))

    def users(self, **kw: Any) -> DotcomUserSource:
        return DotcomUserSource(self.graphql, self.redis, self.config, self.reset_usage, self.clock, **kw)

    def subs(self, **kw: Any) -> ProductSubscriptionSource:
        return ProductSubscriptionSource(self.graphql, self.redis, self.config, self.reset_usage, self.clock, **kw)

    def client(self, **kw: Any) -> GraphQLClient:
        args: dict[str, Any] = {"api_url": self.fake.url, "access_token": self.fake.service_token}
        args.update(kw)
        assert self.http is not None
        return GraphQLClient(self.http, **args)


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro_fn())


async def eventually(condition: Callable[[], bool], *, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def environment(
    redis_url: str | None, *, timeout_s: float = 3.0, **config: Any
) -> AsyncIterator[Env]:
    fake = FakeGraphQL()
    await fake.start()
    http = CurlAsyncHTTPClient(force_instance=True, max_clients=20)
    redis = None
    try:
        if redis_url is not None:
            redis = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        graphql = GraphQLClient(
            http, api_url=fake.url, access_token=fake.service_token, client_id="gw-test",
            environment="dev", version="1.2.3", timeout_s=timeout_s,
        )
        yield Env(fake=fake, graphql=graphql, clock=Clock(), config=make_config(**config), redis=redis, http=http)
    finally:
        await fake.stop()
        http.close()
        if redis is not None:
            await redis.aclose()


def add_alice(fake: FakeGraphQL, *, code_limit: int = 100) -> None:
    limits: Plan = {"chat": (100, 3600, MODELS), "code": (code_limit, 3600, MODELS)}
    fake.add_user(USER_TOKEN, user_id=123456, username="alice", **limits)
    fake.add_user(USER_TOKEN_2, user_id=123456, username="alice", **limits)


def add_acme(fake: FakeGraphQL, **kw: Any) -> None:
    args: dict[str, Any] = {
        "username": "acme-admin", "tags": ["trial", "customer:acme"],
        "chat": (10, 10, []), "code": (1000, 86400, []),
    }
    args.update(kw)
    fake.add_subscription("3b8c-acme", [SUB_TOKEN, SUB_TOKEN_2], **args)


@pytest.fixture(params=["redis", "memory"])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


# --- the GraphQL client -------------------------------------------------------------------


def test_graphql_client_wire_shape() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            add_alice(env.fake)
            data = await env.graphql.query("CheckDotcomUserAccessToken", "query CheckDotcomUserAccessToken { x }",
                                           {"token": USER_TOKEN})
            assert data["dotcom"]["codyGatewayDotcomUserByToken"]["username"] == "alice"
            seen = env.fake.seen[-1]
            assert seen.raw_query == "CheckDotcomUserAccessToken"
            assert seen.headers["Authorization"] == f"token {env.fake.service_token}"
            assert seen.headers["X-Sourcegraph-Client-Id"] == "gw-test"
            assert seen.headers["User-Agent"] == "Cody-Gateway/dev 1.2.3"
            assert seen.body["variables"] == {"token": USER_TOKEN}
            assert env.graphql.url_for("ListProductSubscriptions").endswith("/.api/graphql?ListProductSubscriptions")

            with pytest.raises(GraphQLResponseError) as err:
                await env.graphql.query("CheckDotcomUserAccessToken", "query CheckDotcomUserAccessToken { x }",
                                        {"token": UNKNOWN_USER})
            assert err.value.codes == ["ErrDotcomUserNotFound"]

            wrong = env.client(access_token="wrong", client_id="")
            with pytest.raises(GraphQLHTTPError) as http_err:
                await wrong.query("CheckAccessToken", "query CheckAccessToken { x }")
            assert http_err.value.status == 401

            env.fake.mode = "http500"
            with pytest.raises(GraphQLUnavailable, match="HTTP 500"):
                await env.graphql.query("CheckAccessToken", "query CheckAccessToken { x }")
            assert env.graphql.failing
            env.fake.mode = "up"
            await env.graphql.query("ListProductSubscriptions", "query ListProductSubscriptions { x }")
            assert not env.graphql.failing

            await env.fake.go_down()
            with pytest.raises(GraphQLUnavailable, match="unreachable"):
                await env.graphql.query("CheckAccessToken", "query CheckAccessToken { x }")
            await env.fake.come_back()
            await env.graphql.query("ListProductSubscriptions", "query ListProductSubscriptions { x }")

            env.fake.mode = "hang"
            quick = env.client(timeout_s=0.3)
            started = time.monotonic()
            with pytest.raises(GraphQLUnavailable):
                await quick.query("CheckAccessToken", "query CheckAccessToken { x }")
            assert time.monotonic() - started < 2.0
            await env.fake.come_back()

    run(scenario)


def test_relay_ids() -> None:
    assert decode_user_id("VXNlcjoxMjM0NTY=") == "123456"  # User:123456
    assert decode_user_id("VXNlcjoxMjM0NTY") == "123456"  # padding left off
    assert decode_user_id("NOT_A_VALID_GQL_ID") == ""
    assert decode_user_id("") == ""
    assert decode_user_id("VXNlcjphYmM=") == ""  # User:abc
    assert decode_user_id("VXNlcjo5OTk5OTk5OTk5OTk=") == ""  # beyond int32


# --- dotcom-user ----------------------------------------------------------------------------


def test_dotcom_user_cache_hit_and_miss(redis_url: str | None) -> None:
    async def scenario() -> None:
        async with environment(redis_url) as env:
            add_alice(env.fake)
            source = env.users()
            actor = await source.get(USER_TOKEN)
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 1
            assert (actor.id, actor.name, actor.source, actor.access_enabled) == ("123456", "alice", "dotcom-user", True)
            chat = actor.limit_for("chat_completions")
            assert chat is not None and chat.limit == 100 and chat.interval_s == 3600
            assert chat.allowed_models == tuple(MODELS)
            assert chat.concurrent_requests == 1200  # 100/h = 2400/day, 50 %
            assert chat.concurrent_interval_s == 10.0
            assert actor.limit_for("embeddings") is None  # a zero limit: no access
            assert actor.is_dotcom()

            again = await source.get(USER_TOKEN)
            assert again.id == "123456"
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 1

            if env.redis is not None:
                prefix = cache_prefix("dotcom-users")
                assert await env.redis.exists(prefix + token_key(USER_TOKEN), prefix + "123456") == 2
                # The token itself is stored nowhere: neither in a key nor in a value.
                for key in await env.redis.keys("*"):
                    assert USER_TOKEN.encode() not in key
                    assert USER_TOKEN.encode() not in (await env.redis.get(key) or b"")
                ttl = await env.redis.ttl(prefix + token_key(USER_TOKEN))
                assert 86000 < ttl <= 86400
                # Another gateway process shares the cache: no GraphQL call.
                other = env.users()
                assert (await other.get(USER_TOKEN)).id == "123456"
                assert env.fake.calls["CheckDotcomUserAccessToken"] == 1

            with pytest.raises(NotFromSource):
                await source.get(SUB_TOKEN)
            with pytest.raises(InvalidTokenFormat):
                await source.get("sgd_abc")

    run(scenario)


def test_dotcom_user_not_found_is_cached_negatively(redis_url: str | None) -> None:
    async def scenario() -> None:
        async with environment(redis_url) as env:
            source = env.users()
            for _ in range(3):
                with pytest.raises(TokenDenied) as denied:
                    await source.get(UNKNOWN_USER)
                assert denied.value.reason == "associated dotcom user not found"
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 1
            if env.redis is not None:
                ttl = await env.redis.ttl(cache_prefix("dotcom-users") + token_key(UNKNOWN_USER))
                assert 0 < ttl <= 900

            chain = SourceChain([source], local_cache_ttl_s=0)
            with pytest.raises(TokenDeniedError) as err:
                await chain.get(UNKNOWN_USER)
            assert str(err.value) == (
                "dotcom-user: failed to validate access token: access token denied: associated dotcom user not found"
            )
            assert err.value.status == 401

            # The user appears; the negative entry is re-checked after 15 minutes.
            env.fake.add_user(UNKNOWN_USER, user_id=9, username="late", chat=(5, 60, MODELS))
            env.clock.advance(15 * 60 + 1)
            assert (await source.get(UNKNOWN_USER)).id == "9"
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 2
            assert env.resets == [("9", "chat_completions")]

    run(scenario)


def test_dotcom_user_proactive_refresh_and_usage_reset() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            add_alice(env.fake)
            source = env.users()
            await source.get(USER_TOKEN)
            # A cold cache counts as "no old actor": every valid feature is reset, in the reference's order.
            assert env.resets == [("123456", "code_completions"), ("123456", "chat_completions")]

            # A second token of the same user: the id entry is the old actor; nothing changed.
            env.resets.clear()
            env.clock.advance(5 * 60)
            await source.get(USER_TOKEN_2)
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 2
            assert env.resets == []

            # Fresh within 15 minutes: no call.
            env.clock.advance(9 * 60)
            await source.get(USER_TOKEN)
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 2

            # Stale: re-fetched, and only the changed feature is reset.
            env.clock.advance(2 * 60)
            add_alice(env.fake, code_limit=200)
            actor = await source.get(USER_TOKEN)
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 3
            assert actor.limit_for("code_completions").limit == 200  # type: ignore[union-attr]
            # A new limit with the same interval keeps the usage (the reference resets on an interval change).
            assert env.resets == []

            # The other token is still fresh, but its limits come from the user's id entry.
            env.resets.clear()
            other = await source.get(USER_TOKEN_2)
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 3
            assert other.limit_for("code_completions").limit == 200  # type: ignore[union-attr]
            assert env.resets == []

    run(scenario)


def test_corrupt_cache_entries_are_deleted(redis_url: str | None) -> None:
    async def scenario() -> None:
        async with environment(redis_url) as env:
            add_alice(env.fake)
            users = env.users()
            await users.cache.set(USER_TOKEN, b"{not json")
            actor = await users.get(USER_TOKEN)
            assert actor.id == "123456"
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 1
            assert Actor.from_json(__import__("json").loads(await users.cache.get(token_key(USER_TOKEN)))).id == "123456"

            # A corrupt id entry is dropped when the token entry is served.
            await users.cache.set("123456", b"[1, 2")
            assert (await users.get(USER_TOKEN)).id == "123456"
            assert await users.cache.get("123456") is None
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 1

            add_acme(env.fake)
            subs = env.subs()
            await subs.cache.set(SUB_TOKEN, b"\"a string\"")
            assert (await subs.get(SUB_TOKEN)).id == "3b8c-acme"
            assert env.fake.calls["CheckAccessToken"] == 1

    run(scenario)


def test_update_cooldowns_and_chain_refresh() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            add_alice(env.fake)
            add_acme(env.fake)
            users, subs = env.users(), env.subs()
            chain = SourceChain([users, subs], local_cache_ttl_s=60)
            user = await chain.get(USER_TOKEN)
            sub = await chain.get(SUB_TOKEN)

            env.clock.advance(0.5)
            with pytest.raises(ActorRecentlyUpdated) as err:
                await chain.refresh(user, USER_TOKEN)
            assert str(err.value) == "actor was recently updated - try again in 4m59s"
            with pytest.raises(ActorRecentlyUpdated) as err:
                await chain.refresh(sub, SUB_TOKEN)
            assert str(err.value) == "actor was recently updated - try again in 9m59s"
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 1

            env.clock.advance(300)
            add_alice(env.fake, code_limit=7)
            refreshed = await chain.refresh(user, USER_TOKEN)
            assert refreshed.limit_for("code_completions").limit == 7  # type: ignore[union-attr]
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 2
            # The chain forgot its copy, so the next request sees the new limits.
            assert (await chain.get(USER_TOKEN)).limit_for("code_completions").limit == 7  # type: ignore[union-attr]

            # A refresh by another process (newer cache entry) also counts for the cooldown.
            env.clock.advance(10)
            with pytest.raises(ActorRecentlyUpdated) as err:
                await users.update(user, USER_TOKEN)
            assert str(err.value) == "actor was recently updated - try again in 4m50s"

            env.clock.advance(600)
            assert (await chain.refresh(sub, SUB_TOKEN)).id == "3b8c-acme"
            assert env.fake.calls["CheckAccessToken"] == 2

            # Anonymous actors cannot be updated: refresh is a no-op.
            anonymous = AnonymousSource(allow_anonymous=True, concurrency_percentage=50, concurrency_interval_s=10)
            chain2 = SourceChain([anonymous], local_cache_ttl_s=0)
            anon = await chain2.get("")
            assert await chain2.refresh(anon, "") is anon

    run(scenario)


def test_concurrent_misses_share_one_call() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            add_alice(env.fake)
            source = env.users()
            actors = await asyncio.gather(*(source.get(USER_TOKEN) for _ in range(25)))
            assert {a.id for a in actors} == {"123456"}
            assert env.fake.calls["CheckDotcomUserAccessToken"] == 1

    run(scenario)


# --- product-subscriptions -------------------------------------------------------------


def test_subscription_actor_shape_and_token_forms(redis_url: str | None) -> None:
    async def scenario() -> None:
        async with environment(redis_url) as env:
            add_acme(env.fake)
            source = env.subs()
            legacy = "sgs_" + SUB_TOKEN[4:]
            actor = await source.get(legacy)
            assert env.fake.calls["CheckAccessToken"] == 1
            assert env.fake.seen[-1].body["variables"] == {"token": SUB_TOKEN}
            assert (actor.id, actor.name, actor.source, actor.key) == ("3b8c-acme", "acme", "dotcom-product-subscriptions", hashlib.sha256(SUB_TOKEN.encode()).hexdigest())
            assert actor.access_enabled and dict(actor.endpoint_access) == {"/v1/attribution": True}
            chat = actor.limit_for("chat_completions")
            assert chat is not None and chat.allowed_models == ("*",) and chat.limit == 10 and chat.interval_s == 10
            assert chat.concurrent_requests == 43200  # 10 per 10 s = 86400/day, 50 %
            assert actor.limit_for("embeddings") is None and "embeddings" not in actor.rate_limits

            # Both token forms hit the same cache entry.
            assert (await source.get(SUB_TOKEN)).id == "3b8c-acme"
            assert env.fake.calls["CheckAccessToken"] == 1
            if env.redis is not None:
                assert await env.redis.exists(cache_prefix("product-subscriptions") + token_key(SUB_TOKEN)) == 1

            with pytest.raises(NotFromSource):
                await source.get(USER_TOKEN)
            with pytest.raises(NotFromSource):
                await source.get("")

            with pytest.raises(TokenDenied) as denied:
                await source.get(UNKNOWN_SUB)
            assert denied.value.reason == "associated product subscription not found"
            with pytest.raises(TokenDenied):
                await source.get(UNKNOWN_SUB)
            assert env.fake.calls["CheckAccessToken"] == 2

    run(scenario)


def test_archived_and_disabled_subscriptions() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            env.fake.add_subscription("archived-1", [OTHER_SUB_TOKEN], archived=True, chat=(10, 60, []))
            env.fake.add_subscription("byok-1", [SUB_TOKEN], enabled=False, username="byok")
            source = env.subs()
            archived = await source.get(OTHER_SUB_TOKEN)
            assert not archived.access_allowed("/v1/completions/anthropic")
            assert not archived.access_allowed("/v1/attribution")
            byok = await source.get(SUB_TOKEN)
            assert byok.name == "byok"
            assert not byok.access_allowed("/v1/completions/anthropic")
            assert byok.access_allowed("/v1/attribution")

    run(scenario)


def test_subscription_sync_caches_every_token_and_prunes(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with environment(redis_server.url) as env:
            add_acme(env.fake)
            env.fake.add_subscription("globex", [OTHER_SUB_TOKEN], code=(50, 86400, []))
            prefix = cache_prefix("product-subscriptions")
            gone = token("slk_", "revoked")
            await env.redis.set(prefix + token_key(gone), b"{}")
            await env.redis.set(prefix + "extra:part", b"{}")  # 5 parts: skipped
            await env.redis.set(prefix + "sgp_dotcom", b"{}")  # not a token digest: left alone
            await env.redis.set(cache_prefix("dotcom-users") + token_key(USER_TOKEN), b"{}")  # other namespace

            source = env.subs()
            chain = SourceChain([source], local_cache_ttl_s=60)
            assert await chain.sync_all() == {"product-subscriptions": 3}
            assert source.last_sync_pruned == 1
            assert env.fake.calls["ListProductSubscriptions"] == 1
            for tok in (SUB_TOKEN, SUB_TOKEN_2, OTHER_SUB_TOKEN):
                assert 86000 < await env.redis.ttl(prefix + token_key(tok)) <= 86400
            assert await env.redis.exists(prefix + token_key(gone)) == 0
            assert await env.redis.exists(prefix + "extra:part", prefix + "sgp_dotcom") == 2
            assert await env.redis.exists(cache_prefix("dotcom-users") + token_key(USER_TOKEN)) == 1
            assert env.resets == []  # nothing cached before: no plan change to react to

            # Synced tokens are served without a CheckAccessToken call.
            assert (await chain.get(SUB_TOKEN_2)).id == "3b8c-acme"
            assert env.fake.calls["CheckAccessToken"] == 0

            # A plan change: the synced limit changes, usage is reset once per subscription.
            env.fake.remove_subscription("3b8c-acme")
            add_acme(env.fake, code=(2000, 86400, []))
            # A subscription goes away: its token is pruned.
            env.fake.remove_subscription("globex")
            assert await chain.sync_all() == {"product-subscriptions": 2}
            assert env.resets == []  # the limit changed, the interval did not
            assert await env.redis.exists(prefix + token_key(OTHER_SUB_TOKEN)) == 0
            with pytest.raises(TokenDeniedError):
                await chain.get(OTHER_SUB_TOKEN)
            assert (await chain.get(SUB_TOKEN)).limit_for("code_completions").limit == 2000  # type: ignore[union-attr]

            # A failed listing prunes nothing.
            env.fake.mode = "http500"
            report = await chain.sync_all()
            assert str(report["product-subscriptions"]).startswith("error: failed to list subscriptions")
            assert await env.redis.exists(prefix + token_key(SUB_TOKEN)) == 1

    run(scenario)


def test_sync_prunes_in_memory_cache_too() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            add_acme(env.fake)
            source = env.subs()
            cache = source.cache
            assert isinstance(cache, MemoryActorCache)
            cache.raw_set(cache.prefix + token_key(token("slk_", "old")), b"{}")
            cache.raw_set(cache.prefix + "a:b", b"{}")
            assert await source.sync() == 2
            assert source.last_sync_pruned == 1
            assert sorted(await cache.full_keys()) == sorted(
                [cache.prefix + token_key(SUB_TOKEN), cache.prefix + token_key(SUB_TOKEN_2), cache.prefix + "a:b"]
            )

    run(scenario)


@pytest.mark.timeout(30)
def test_two_sync_workers_share_one_lock(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with environment(redis_server.url) as env:
            add_acme(env.fake)
            # Two "processes": separate sources and chains, one Redis, one GraphQL API.
            chain_a = SourceChain([env.subs()], local_cache_ttl_s=0)
            chain_b = SourceChain([env.subs()], local_cache_ttl_s=0)
            redis_b = aioredis.Redis.from_url(redis_server.url)
            worker_a = SyncWorker(chain_a.sync_all, env.redis, interval_s=0.05)
            worker_b = SyncWorker(chain_b.sync_all, redis_b, interval_s=0.05)
            try:
                worker_a.start()
                await eventually(lambda: worker_a.syncs >= 2, what="worker A syncing")
                assert 0 < await env.redis.pttl(LOCK_NAME) <= 200  # 4x the interval
                worker_b.start()
                await eventually(lambda: worker_b.skipped >= 3, what="worker B skipping")
                assert worker_b.syncs == 0
                assert worker_a.last_result == {"product-subscriptions": 2}

                await worker_a.stop()
                stopped_at = worker_a.syncs
                await eventually(lambda: worker_b.syncs >= 2, what="worker B taking over")
                assert worker_a.syncs == stopped_at
                assert worker_b.holds_lock and not worker_a.holds_lock
            finally:
                await worker_a.stop()
                await worker_b.stop()
                await redis_b.aclose()

    run(scenario)


@pytest.mark.timeout(30)
def test_sync_worker_takes_over_an_expired_lock(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        async with environment(redis_server.url) as env:
            add_acme(env.fake)
            # A holder that died without releasing: the key expires after 4x the interval.
            await env.redis.set(LOCK_NAME, b"dead-process", px=300)
            worker = SyncWorker(env.subs().sync, env.redis, interval_s=0.05)
            try:
                worker.start()
                await eventually(lambda: worker.skipped >= 1, what="a skipped tick")
                assert worker.syncs == 0
                await eventually(lambda: worker.syncs >= 1, what="the lock to expire and be taken")
            finally:
                await worker.stop()
            # Without Redis there is one process: it always syncs.
            alone = SyncWorker(env.subs().sync, None, interval_s=0.05)
            alone.start()
            try:
                await eventually(lambda: alone.syncs >= 2, what="the Redis-less worker")
            finally:
                await alone.stop()

    run(scenario)


# --- outages ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_graphql_down_then_back(redis_url: str | None) -> None:
    async def scenario() -> None:
        # A cache TTL longer than the 24 h refresh age, so a stale subscription is still cached.
        async with environment(redis_url, timeout_s=1.0, sources_cache_ttl=2 * 86400.0) as env:
            add_alice(env.fake)
            add_acme(env.fake)
            users, subs = env.users(), env.subs()
            chain = SourceChain([users, subs], local_cache_ttl_s=0)
            await chain.get(USER_TOKEN)
            await chain.get(SUB_TOKEN)
            calls_before = sum(env.fake.calls.values())

            await env.fake.go_down()
            # Fresh cached actors: served without a call.
            assert (await chain.get(USER_TOKEN)).id == "123456"
            # Stale cached actors: the refresh fails, the cached actor is served anyway.
            env.clock.advance(25 * 3600)
            started = time.monotonic()
            assert (await chain.get(USER_TOKEN)).id == "123456"
            assert (await chain.get(SUB_TOKEN)).id == "3b8c-acme"
            # Unknown tokens: a clear 503, no negative entry.
            with pytest.raises(ServiceUnavailable) as err:
                await chain.get(USER_TOKEN_2)
            assert err.value.status == 503
            assert str(err.value).startswith("dotcom-user: cannot validate access token right now:")
            assert "unreachable" in str(err.value)
            with pytest.raises(ServiceUnavailable):
                await chain.get(UNKNOWN_SUB)
            assert time.monotonic() - started < 5.0
            assert sum(env.fake.calls.values()) == calls_before

            await env.fake.come_back()
            # The first successful call ends the outage; stale actors are refreshed again.
            env.fake.add_user(UNKNOWN_USER, user_id=77, username="bob", chat=(1, 60, MODELS))
            assert (await chain.get(UNKNOWN_USER)).id == "77"
            assert (await chain.get(USER_TOKEN_2)).id == "123456"
            assert not env.graphql.failing
            before = env.fake.calls["CheckDotcomUserAccessToken"]
            assert (await chain.get(USER_TOKEN)).last_updated == env.clock.now
            assert env.fake.calls["CheckDotcomUserAccessToken"] == before + 1
            with pytest.raises(TokenDeniedError):
                await chain.get(UNKNOWN_SUB)

    run(scenario)


@pytest.mark.timeout(30)
def test_graphql_hanging_is_bounded() -> None:
    async def scenario() -> None:
        async with environment(None, timeout_s=0.4) as env:
            add_alice(env.fake)
            source = env.users()
            chain = SourceChain([source], local_cache_ttl_s=0)
            await chain.get(USER_TOKEN)
            env.fake.mode = "hang"
            env.clock.advance(16 * 60)
            started = time.monotonic()
            # The first stale lookup waits for the timeout once, then serves the cached actor.
            assert (await chain.get(USER_TOKEN)).id == "123456"
            first = time.monotonic() - started
            assert first < 2.0
            # While the API is known to be failing, stale actors are served without waiting.
            started = time.monotonic()
            for _ in range(20):
                assert (await chain.get(USER_TOKEN)).id == "123456"
            assert time.monotonic() - started < 0.5
            hanging_calls = env.fake.calls["CheckDotcomUserAccessToken"]
            # Unknown tokens get a 503 after the bounded timeout; concurrent ones share one call.
            started = time.monotonic()
            results = await asyncio.gather(*(chain.get(USER_TOKEN_2) for _ in range(10)), return_exceptions=True)
            assert all(isinstance(r, ServiceUnavailable) for r in results)
            assert time.monotonic() - started < 2.0
            assert env.fake.calls["CheckDotcomUserAccessToken"] == hanging_calls + 1
            await env.fake.come_back()

    run(scenario)


def test_other_graphql_errors_are_503_without_negative_caching() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            add_alice(env.fake)
            env.fake.fail_with["CheckDotcomUserAccessToken"] = "INTERNAL_SERVER_ERROR"
            chain = SourceChain([env.users()], local_cache_ttl_s=0)
            with pytest.raises(ServiceUnavailable, match="failure INTERNAL_SERVER_ERROR"):
                await chain.get(USER_TOKEN)
            del env.fake.fail_with["CheckDotcomUserAccessToken"]
            assert (await chain.get(USER_TOKEN)).id == "123456"

    run(scenario)


@pytest.mark.timeout(30)
def test_cache_redis_down_falls_through_to_graphql(tmp_path: Any) -> None:
    async def scenario() -> None:
        server = RedisServer(tmp_path / "redis")
        server.start()
        try:
            async with environment(server.url) as env:
                add_alice(env.fake)
                source = env.users()
                await source.get(USER_TOKEN)
                server.stop()
                # The cache is an optimisation: without it every lookup asks the API.
                assert (await source.get(USER_TOKEN)).id == "123456"
                assert (await source.get(USER_TOKEN)).id == "123456"
                assert env.fake.calls["CheckDotcomUserAccessToken"] == 3
                server.start()
                await source.get(USER_TOKEN)
                await source.get(USER_TOKEN)
                assert env.fake.calls["CheckDotcomUserAccessToken"] == 4
        finally:
            server.stop()

    run(scenario)


def test_chain_order_and_format_errors() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            add_alice(env.fake)
            add_acme(env.fake)
            anonymous = AnonymousSource(allow_anonymous=False, concurrency_percentage=50, concurrency_interval_s=10)
            chain = SourceChain([anonymous, env.users(), env.subs()], local_cache_ttl_s=10)
            assert (await chain.get("")).id == "anonymous"
            assert (await chain.get(USER_TOKEN)).source == "dotcom-user"
            assert (await chain.get("sgs_" + SUB_TOKEN[4:])).source == "dotcom-product-subscriptions"
            with pytest.raises(Unauthorized, match="invalid token format"):
                await chain.get("sgd_1234")
            with pytest.raises(Unauthorized, match="no source found for token"):
                await chain.get("some-other-token")
            assert sum(env.fake.calls.values()) == 2

    run(scenario)


# --- attribution ---------------------------------------------------------------------------


def test_attribution_search() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            env.fake.attribution = {
                "totalCount": 2, "limitHit": True,
                "nodes": [{"repositoryName": "github.com/sourcegraph/sourcegraph"},
                          {"repositoryName": "github.com/sourcegraph/cody"}],
            }
            search = AttributionSearch(env.graphql, enabled=True)
            body = await search.search("func main() {}", 2)
            assert body == {
                "Repositories": [{"name": "github.com/sourcegraph/sourcegraph"}, {"name": "github.com/sourcegraph/cody"}],
                "totalCount": 2,
                "limitHit": True,
            }
            assert env.fake.seen[-1].raw_query == "SnippetAttribution"
            assert env.fake.seen[-1].body["variables"] == {"snippet": "func main() {}", "limit": 2}
            await search.search("x", 0)
            assert env.fake.seen[-1].body["variables"]["limit"] == 4
            assert [clamp_limit(n) for n in (-1, 0, 1, 4, 5, 100)] == [4, 4, 1, 4, 4, 4]

            env.fake.attribution = {"totalCount": 0, "limitHit": False, "nodes": []}
            assert await search.search("x", 1) == {"Repositories": None}

            with pytest.raises(ServiceUnavailable, match=r"^attribution search not enabled$"):
                await AttributionSearch(env.graphql, enabled=False).search("x", 1)
            with pytest.raises(ServiceUnavailable):
                await AttributionSearch(None, enabled=True).search("x", 1)

            env.fake.fail_with["SnippetAttribution"] = "SEARCH_FAILED"
            with pytest.raises(UpstreamError) as err:
                await search.search("x", 1)
            assert err.value.status == 502
            assert str(err.value).startswith("fetching SnippetAttribution from sourcegraph.com: ")
            await env.fake.go_down()
            with pytest.raises(UpstreamError):
                await search.search("x", 1)

    run(scenario)


@pytest.mark.timeout(60)
def test_cache_sync_and_lock_on_redis_cluster(redis_cluster: Any) -> None:
    from redisconn.connect import connect

    async def scenario() -> None:
        async with environment(None) as env:
            client = connect(redis_cluster.url, timeout_ms=2000, max_connections=16)
            try:
                env.redis = client
                add_alice(env.fake)
                add_acme(env.fake)
                env.fake.add_subscription("globex", [OTHER_SUB_TOKEN], code=(50, 86400, []))
                users, subs = env.users(), env.subs()
                assert (await users.get(USER_TOKEN)).id == "123456"
                assert (await env.users().get(USER_TOKEN)).id == "123456"
                assert env.fake.calls["CheckDotcomUserAccessToken"] == 1
                # Keys of many slots: SCAN over every node, MGET and DEL split by slot.
                gone = [token("slk_", f"revoked-{i}") for i in range(20)]
                for tok in gone:
                    await client.set(cache_prefix("product-subscriptions") + token_key(tok), b"{}")
                assert await subs.sync() == 3
                assert subs.last_sync_pruned == 20
                env.fake.remove_subscription("globex")
                add_acme(env.fake, code=(5, 86400, []))
                env.fake.subscriptions = env.fake.subscriptions[-1:]
                assert await subs.sync() == 2
                assert ("3b8c-acme", "code_completions") not in env.resets  # same interval: no reset
                assert subs.last_sync_pruned == 1
                assert (await subs.get(SUB_TOKEN)).limit_for("code_completions").limit == 5  # type: ignore[union-attr]
                assert env.fake.calls["CheckAccessToken"] == 0

                worker_a = SyncWorker(subs.sync, client, interval_s=0.05)
                worker_b = SyncWorker(env.subs().sync, client, interval_s=0.05)
                try:
                    worker_a.start()
                    await eventually(lambda: worker_a.syncs >= 1, what="worker A on the cluster")
                    worker_b.start()
                    await eventually(lambda: worker_b.skipped >= 2, what="worker B skipping")
                    assert worker_b.syncs == 0
                    await worker_a.stop()
                    await eventually(lambda: worker_b.syncs >= 1, what="worker B taking over")
                finally:
                    await worker_a.stop()
                    await worker_b.stop()
            finally:
                await client.aclose()
                env.redis = None

    run(scenario)
