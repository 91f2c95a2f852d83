"""Actor sources through the real gateway process: GraphQL-backed actors, attribution,
limits refresh, the sync endpoint and worker, GraphQL outages, and static-file edits under load.

The GraphQL API is fakes.graphql running on its own thread;
Redis, where used, is a real redis-server.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes.graphql import FakeGraphQL, FakeGraphQLThread, Plan
from fakes.processes import GatewayProcess, wait_until, write_actors
from tests.conftest import DIAGNOSTICS_SECRET, TOKEN_A, TOKEN_B, actor, limits
from tests.support.redis_servers import RedisServer
from tests.test_anthropic_messages import message_body, post

pytestmark = pytest.mark.timeout(90)

SERVICE_TOKEN = "graphql-service-token-for-tests"
ALL = ["*"]


def token(prefix: str, name: str) -> str:
    return prefix + hashlib.sha256(name.encode()).hexdigest()


ALICE = token("sgd_", "alice")
BOB = token("sgd_", "bob")
ACME = token("slk_", "acme")
BYOK = token("slk_", "byok")


def fixtures(fake: FakeGraphQL) -> None:
    plan: Plan = {"chat": (1000, 3600, ALL), "code": (1000, 3600, ALL)}
    fake.add_user(ALICE, user_id=42, username="alice", **plan)
    fake.add_subscription("acme-uuid", [ACME], tags=["customer:acme"], **plan)
    fake.add_subscription("byok-uuid", [BYOK], enabled=False)
    fake.attribution = {
        "totalCount": 2,
        "limitHit": True,
        "nodes": [{"repositoryName": "github.com/sourcegraph/sourcegraph"},
                  {"repositoryName": "github.com/sourcegraph/cody"}],
    }


@pytest.fixture
def graphql() -> Iterator[FakeGraphQLThread]:
    fake = FakeGraphQLThread(SERVICE_TOKEN)
    fake.call(fixtures)
    try:
        yield fake
    finally:
        fake.stop()


def remote_env(graphql: FakeGraphQLThread, redis: RedisServer | None = None, **extra: str) -> dict[str, str]:
    env = {
        "CODY_GATEWAY_DOTCOM_API_URL": graphql.url,
        "CODY_GATEWAY_DOTCOM_ACCESS_TOKEN": SERVICE_TOKEN,
        "CODY_GATEWAY_ENABLE_ATTRIBUTION_SEARCH": "true",
        # No in-process actor cache: every request goes through the sources and their cache.
        "CODY_GATEWAY_ACTORS_LOCAL_CACHE_TTL": "0s",
    }
    if redis is not None:
        env["REDIS_ENDPOINT"] = redis.url
    env.update(extra)
    return env


def start_remote(start_gateway: Any, env: dict[str, str], **kw: Any) -> GatewayProcess:
    gw: GatewayProcess = start_gateway(env=env, **kw)
    # Logged while building, before "listening on", so it is already in the output.
    assert "actor sources dotcom-user, product-subscriptions use" in gw.process.output()
    return gw


def call(gw: GatewayProcess, method: str, path: str, tok: str | None = None, body: Any = None,
         raw: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    hdrs = dict(headers or {})
    if tok is not None:
        hdrs["Authorization"] = f"Bearer {tok}"
    content = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    return httpx.request(method, gw.base_url + path, content=content, headers=hdrs, timeout=30)


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return str(response.json()["error"])


def test_graphql_actors_serve_requests(start_gateway: Any, graphql: FakeGraphQLThread, redis_server: RedisServer) -> None:
    gw = start_remote(start_gateway, remote_env(graphql, redis_server))
    for _ in range(3):
        assert post(gw, message_body(), token=ALICE).status_code == 200
    assert graphql.calls("CheckDotcomUserAccessToken") == 1  # then served from the Redis cache

    # The start-up sync cached every subscription token: no per-token lookup.
    wait_until(lambda: graphql.calls("ListProductSubscriptions") >= 1, what="the first sync")
    legacy = "sgs_" + ACME[4:]
    assert post(gw, message_body(), token=legacy).status_code == 200
    assert graphql.calls("CheckAccessToken") == 0

    limits_body = call(gw, "GET", "/v1/limits", ALICE).json()
    assert limits_body["chat_completions"]["limit"] == 1000

    message = error_of(post(gw, message_body(), token=BOB), 401)
    assert message == "dotcom-user: failed to validate access token: access token denied: associated dotcom user not found"
    event = gw.wait_events(1, "Unauthorized")[0]
    assert event["source"] == "dotcom-user" and event["identifier"] == "unknown"
    assert event["metadata"]["reason"] == "associated dotcom user not found"

    assert error_of(post(gw, message_body(), token=BYOK), 403) == "Cody Gateway access not enabled"
    assert error_of(post(gw, message_body(), token="sgd_123"), 401) == "dotcom-user: invalid token format"


def test_attribution(start_gateway: Any, graphql: FakeGraphQLThread) -> None:
    gw = start_remote(start_gateway, remote_env(graphql))
    response = call(gw, "POST", "/v1/attribution", ACME, {"snippet": "func main() {}", "limit": 2})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {
        "Repositories": [{"name": "github.com/sourcegraph/sourcegraph"}, {"name": "github.com/sourcegraph/cody"}],
        "totalCount": 2,
        "limitHit": True,
    }
    assert call(gw, "POST", "/v1/attribution", ACME, {"snippet": "x", "limit": 10}).status_code == 200
    assert graphql.call(lambda f: f.seen[-1].body["variables"]["limit"]) == 4

    # Cody Gateway access off, attribution granted by endpointAccess.
    assert call(gw, "POST", "/v1/attribution", BYOK, {"snippet": "x", "limit": 1}).status_code == 200

    only = "only available for enterprise product subscriptions"
    assert error_of(call(gw, "POST", "/v1/attribution", ALICE, {"snippet": "x", "limit": 1}), 401) == only
    assert error_of(call(gw, "POST", "/v1/attribution", TOKEN_A, {"snippet": "x", "limit": 1}), 401) == only
    error_of(call(gw, "POST", "/v1/attribution", ACME, raw=b"{not json"), 400)
    error_of(call(gw, "POST", "/v1/attribution", ACME, {"snippet": 5}), 400)

    graphql.call(lambda f: f.fail_with.__setitem__("SnippetAttribution", "SEARCH_DOWN"))
    message = error_of(call(gw, "POST", "/v1/attribution", ACME, {"snippet": "x", "limit": 1}), 502)
    assert message.startswith("fetching SnippetAttribution from sourcegraph.com: ")

    disabled = start_remote(
        start_gateway, remote_env(graphql, CODY_GATEWAY_ENABLE_ATTRIBUTION_SEARCH="false"), name="no-attribution"
    )
    response = call(disabled, "POST", "/v1/attribution", ACME, {"snippet": "x", "limit": 1})
    assert error_of(response, 503) == "attribution search not enabled"


def test_limits_refresh_cooldown(start_gateway: Any, graphql: FakeGraphQLThread) -> None:
    gw = start_remote(start_gateway, remote_env(graphql))
    assert post(gw, message_body(), token=ALICE).status_code == 200
    response = call(gw, "POST", "/v1/limits/refresh", ALICE)
    assert re.fullmatch(r"actor was recently updated - try again in 4m5\ds", error_of(response, 429))
    assert 1 <= int(response.headers["Retry-After"]) <= 300
    response = call(gw, "POST", "/v1/limits/refresh", ACME)
    assert re.fullmatch(r"actor was recently updated - try again in 9m5\ds", error_of(response, 429))
    assert graphql.calls("CheckDotcomUserAccessToken") == 1
    # Static actors cannot be updated: 200, nothing happens.
    assert call(gw, "POST", "/v1/limits/refresh", TOKEN_A).status_code == 200


def test_graphql_outage(start_gateway: Any, graphql: FakeGraphQLThread, redis_server: RedisServer) -> None:
    gw = start_remote(start_gateway, remote_env(graphql, redis_server))
    assert post(gw, message_body(), token=ALICE).status_code == 200
    wait_until(lambda: graphql.calls("ListProductSubscriptions") >= 1, what="the first sync")

    graphql.run(graphql.fake.go_down)
    started = time.monotonic()
    assert post(gw, message_body(), token=ALICE).status_code == 200  # cached actors keep working
    assert post(gw, message_body(), token=ACME).status_code == 200
    message = error_of(post(gw, message_body(), token=BOB), 503)
    assert message.startswith("dotcom-user: cannot validate access token right now:")
    assert time.monotonic() - started < 10

    graphql.call(lambda f: f.add_user(BOB, user_id=7, username="bob", chat=(10, 60, ALL)))
    graphql.run(graphql.fake.come_back)
    assert post(gw, message_body(), token=BOB).status_code == 200  # no negative entry was cached


def test_sync_all_sources_endpoint(start_gateway: Any, graphql: FakeGraphQLThread) -> None:
    gw = start_remote(start_gateway, remote_env(graphql))
    assert call(gw, "POST", "/-/actor/sync-all-sources").status_code == 401
    assert call(gw, "POST", "/-/actor/sync-all-sources", "wrong").status_code == 401
    response = call(gw, "POST", "/-/actor/sync-all-sources", DIAGNOSTICS_SECRET)
    assert response.status_code == 200, response.text
    assert response.json() == {"synced": {"static": 2, "product-subscriptions": 2}}

    graphql.run(graphql.fake.go_down)
    message = error_of(call(gw, "GET", "/-/actor/sync-all-sources", DIAGNOSTICS_SECRET), 500)
    assert "product-subscriptions: error: failed to list subscriptions" in message
    graphql.run(graphql.fake.come_back)


@pytest.mark.timeout(120)
def test_one_sync_worker_among_gateways(start_gateway: Any, graphql: FakeGraphQLThread, redis_server: RedisServer) -> None:
    def syncs_by(client_id: str) -> int:
        return int(graphql.call(lambda f: sum(
            1 for s in f.seen
            if s.operation == "ListProductSubscriptions" and s.headers.get("X-Sourcegraph-Client-Id") == client_id
        )))

    fast = {"CODY_GATEWAY_SOURCES_SYNC_INTERVAL": "200ms"}
    first = start_remote(
        start_gateway, remote_env(graphql, redis_server, CODY_GATEWAY_DOTCOM_CLIENT_ID="gw-1", **fast), name="gw-1"
    )
    wait_until(lambda: syncs_by("gw-1") >= 2, what="gw-1 syncing")
    second = start_remote(
        start_gateway, remote_env(graphql, redis_server, CODY_GATEWAY_DOTCOM_CLIENT_ID="gw-2", **fast), name="gw-2"
    )
    mark = syncs_by("gw-1")
    wait_until(lambda: syncs_by("gw-1") >= mark + 4, what="gw-1 syncing while gw-2 runs")
    assert syncs_by("gw-2") == 0

    first.stop()  # releases the lock on the way out
    stopped = syncs_by("gw-1")
    wait_until(lambda: syncs_by("gw-2") >= 2, timeout=15, what="gw-2 taking over")
    assert syncs_by("gw-1") == stopped
    second.stop()


@pytest.mark.timeout(120)
def test_static_actors_file_edited_while_requests_flow(start_gateway: Any, tmp_path: Path) -> None:
    gw = start_gateway()
    actors_file = Path(gw.env["CODY_GATEWAY_STATIC_ACTORS_FILE"])
    token_c = "sgd_" + "c" * 64
    token_d = "sgd_" + "d" * 64
    statuses: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=gw.base_url, timeout=30) as client:
            while not stop.is_set():
                try:
                    r = client.get("/v1/limits", headers={"Authorization": f"Bearer {TOKEN_A}"})
                    statuses.append(r.status_code)
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))

    def status_of(tok: str) -> int:
        return call(gw, "GET", "/v1/limits", tok).status_code

    worker = threading.Thread(target=traffic, name="traffic")
    worker.start()
    try:
        wait_until(lambda: len(statuses) >= 20, what="traffic")
        a = actor("actor-a", TOKEN_A)
        b = actor("actor-b", TOKEN_B)
        # 1. Atomic replace that adds an actor.
        write_actors(actors_file, [a, b, actor("actor-c", token_c)])
        wait_until(lambda: status_of(token_c) == 200, timeout=15, what="actor-c after reload")
        # 2. A broken file written in place: rejected, the previous actors keep serving.
        mark = len(gw.process.lines)
        actors_file.write_text('[{"id": "broken", "token": ')
        gw.process.wait_for("rejected, keeping the previous actors", timeout=15, start=mark)
        assert status_of(token_c) == 200
        # 3. In-place rewrite (truncate, write) with new limits and another actor.
        actors_file.write_text(json.dumps([actor("actor-a", TOKEN_A, chat_completions=limits(77)),
                                           actor("actor-d", token_d)]))
        wait_until(lambda: status_of(token_d) == 200, timeout=15, what="actor-d after reload")
        before = len(statuses)
        wait_until(lambda: len(statuses) >= before + 20, what="more traffic")
    finally:
        stop.set()
        worker.join(timeout=30)
    assert errors == []
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
