"""Issue 17, actor side: usage reset only on an interval change (18); the reference's source names (20).

Through the sources, against the local GraphQL fake (fakes/graphql.py); cache in process.
"""

from __future__ import annotations

import pytest

from actors.chain import SourceChain, TokenDeniedError
from fakes.graphql import Plan
from tests.test_actor_sources import (
    MODELS,
    SUB_TOKEN,
    UNKNOWN_SUB,
    USER_TOKEN,
    add_acme,
    add_alice,
    environment,
    run,
)

pytestmark = pytest.mark.timeout(60)



def test_dotcom_user_usage_is_reset_only_when_the_interval_changes() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            add_alice(env.fake)
            source = env.users()
            await source.get(USER_TOKEN)
            # Cold cache: no old actor, every valid feature is reset (the reference's rule).
            assert env.resets == [("123456", "code_completions"), ("123456", "chat_completions")]
            env.resets.clear()

            # Only the limit changes: the reference keeps the usage.
            env.clock.advance(16 * 60)
            add_alice(env.fake, code_limit=200)
            actor = await source.get(USER_TOKEN)
            assert actor.limit_for("code_completions").limit == 200  # type: ignore[union-attr]
            assert env.resets == []

            # The interval changes: that feature's usage is reset.
            env.clock.advance(16 * 60)
            limits: Plan = {"chat": (100, 3600, MODELS), "code": (200, 600, MODELS)}
            env.fake.add_user(USER_TOKEN, user_id=123456, username="alice", **limits)
            await source.get(USER_TOKEN)
            assert env.resets == [("123456", "code_completions")]

    run(scenario)


def test_subscription_usage_is_not_reset_by_a_limit_change() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            add_acme(env.fake)
            source = env.subs()
            assert await source.sync() == 2
            env.fake.remove_subscription("3b8c-acme")
            add_acme(env.fake, code=(2000, 86400, []))
            assert await source.sync() == 2
            assert env.resets == []
            env.fake.remove_subscription("3b8c-acme")
            add_acme(env.fake, code=(2000, 3600, []))
            assert await source.sync() == 2
            assert env.resets == [("3b8c-acme", "code_completions")]

    run(scenario)


def test_subscription_actors_carry_the_reference_source_name() -> None:
    async def scenario() -> None:
        async with environment(None) as env:
            add_acme(env.fake)
            users, subs = env.users(), env.subs()
            chain = SourceChain([users, subs], local_cache_ttl_s=0)
            actor = await chain.get(SUB_TOKEN)
            assert actor.source == "dotcom-product-subscriptions"
            # The configured name stays: config, sync report, error messages.
            assert subs.name == "product-subscriptions"
            assert chain.source("product-subscriptions") is subs
            # Refresh finds the source from the actor's (reference) source name.
            env.clock.advance(3600)
            assert (await chain.refresh(actor, SUB_TOKEN)).source == "dotcom-product-subscriptions"
            # A denied token's Unauthorized event names the reference's source too.
            with pytest.raises(TokenDeniedError) as denied:
                await chain.get(UNKNOWN_SUB)
            assert denied.value.source == "dotcom-product-subscriptions"
            assert str(denied.value).startswith("product-subscriptions: ")
            # Synced and cached actors too.
            await subs.sync()
            assert (await subs.get(SUB_TOKEN)).source == "dotcom-product-subscriptions"
            assert (await users.get(USER_TOKEN) if False else actor).is_dotcom() is False

    run(scenario)
