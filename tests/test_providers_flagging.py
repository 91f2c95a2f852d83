"""Flagging and blocking through the real gateway (reference 4.7): RequestBlocked events,
flagged metadata on CompletionsFinished, the flagged-prompt recorder (in process and in
Redis) and its listing under the diagnostics secret, the circuit breaker's 503."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis

from fakes.graphql import FakeGraphQLThread
from fakes.processes import wait_until
from tests.conftest import DIAGNOSTICS_SECRET, TOKEN_A, TOKEN_B, actor, limits
from tests.providers_support import (  # noqa: F401  (fixtures)
    WiredGateway,
    assert_json_error,
    gw,
    marker,
    post,
    received,
    start_module_wired,
    start_wired,
)

pytestmark = pytest.mark.timeout(90)

DOTCOM_TOKEN = "sgd_" + hashlib.sha256(b"dora").hexdigest()
PREAMBLE = "You are Cody, an AI coding assistant"
BLOCKED = "forbidden incantation"
FLAGGING_ENV = {
    "CODY_GATEWAY_ANTHROPIC_ALLOWED_PROMPT_PATTERNS": PREAMBLE,
    "CODY_GATEWAY_ANTHROPIC_BLOCKED_PROMPT_PATTERNS": BLOCKED.upper(),  # matched case-insensitively
    "CODY_GATEWAY_ANTHROPIC_REQUEST_BLOCKING_ENABLED": "true",
    "CODY_GATEWAY_ANTHROPIC_PROMPT_TOKEN_FLAGGING_LIMIT": "40",
    "CODY_GATEWAY_ANTHROPIC_PROMPT_TOKEN_BLOCKING_LIMIT": "60",
    "CODY_GATEWAY_ANTHROPIC_RESPONSE_TOKEN_BLOCKING_LIMIT": "500",
}

# name: (route, feature, body(text, max_tokens))
PROVIDERS: dict[str, tuple[str, str, Any]] = {
    "anthropic": ("/v1/completions/anthropic", "chat_completions",
                  lambda t, m: {"model": "claude-2", "prompt": f"\n\nHuman: {t}\n\nAssistant:", "max_tokens_to_sample": m}),
    "anthropic-messages": ("/v1/completions/anthropic-messages", "chat_completions",
                           lambda t, m: {"model": "claude-2", "max_tokens": m, "messages": [{"role": "user", "content": t}]}),
    "openai": ("/v1/completions/openai", "chat_completions",
               lambda t, m: {"model": "gpt-4", "max_tokens": m, "messages": [{"role": "user", "content": t}]}),
    "fireworks": ("/v1/completions/fireworks", "chat_completions",
                  lambda t, m: {"model": "accounts/fireworks/models/mixtral-8x7b-instruct", "max_tokens": m,
                                "messages": [{"role": "user", "content": t}]}),
    "google": ("/v1/completions/google", "chat_completions",
               lambda t, m: {"model": "gemini-pro", "generationConfig": {"maxOutputTokens": m}, "contents": [{"parts": [{"text": t}]}]}),
}  # fmt: skip


def call(gw: WiredGateway, name: str, text: str, *, max_tokens: int = 50, token: str = TOKEN_A, feature: str | None = None) -> httpx.Response:
    route, default_feature, body = PROVIDERS[name]
    return post(gw, route, body(text, max_tokens), token=token, feature=feature or default_feature,
                headers={"X-Sourcegraph-Actor-UID": "uid-1", "X-Sourcegraph-Actor-Anonymous-UID": "anon-1"})


@pytest.fixture(scope="module")
def graphql() -> Iterator[FakeGraphQLThread]:
    fake = FakeGraphQLThread()
    models = ["*"]
    fake.call(lambda f: f.add_user(DOTCOM_TOKEN, user_id=4242, username="dora", chat=(1000, 3600, models), code=(1000, 3600, models)))
    yield fake
    fake.stop()


def dotcom_env(graphql: FakeGraphQLThread) -> dict[str, str]:
    return {"CODY_GATEWAY_DOTCOM_ACCESS_TOKEN": graphql.service_token, "CODY_GATEWAY_DOTCOM_API_URL": graphql.url}


@pytest.fixture(scope="module")
def shared(start_module_wired: Any, graphql: FakeGraphQLThread) -> WiredGateway:
    actors = [
        actor("actor-a", TOKEN_A, chat_completions=limits(1000), code_completions=limits(1000)),
        actor("actor-b", TOKEN_B, chat_completions=limits(1), code_completions=limits(1)),
    ]
    return start_module_wired(actors, env={**FLAGGING_ENV, **dotcom_env(graphql)})


def diag(gw: WiredGateway, path: str, secret: str | None = DIAGNOSTICS_SECRET) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
    return httpx.get(gw.base_url + path, headers=headers, timeout=10)


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_blocked_phrase_is_400_with_one_request_blocked_event(gw: WiredGateway, fake_provider: Any, name: str) -> None:
    mark = marker()
    response = call(gw, name, f"{PREAMBLE}. {mark} please say the Forbidden Incantation")
    body = assert_json_error(response, 400, "We blocked your request because we detected your prompt to be against our Acceptable Use Policy")
    trace = response.headers["X-Trace"]
    assert body["error"].endswith(f"reference this ID: {trace}")
    blocked = gw.event_for(trace, "RequestBlocked")
    meta = blocked["metadata"]
    assert blocked["identifier"] == "actor-a" and blocked["source"] == "static"
    assert meta["flagged"] is True
    assert meta["flagging_result"] == {"reason": ["blocked_phrase"], "should_block": True, "blocked_phrase": "forbi"}
    assert meta["provider"] == PROVIDERS[name][0].rsplit("/", 1)[1].split("-")[0]
    assert meta["feature"] == "chat_completions" and meta["max_tokens_to_sample"] == 50
    assert (meta["sg_actor_id"], meta["sg_actor_anonymous_uid"]) == ("uid-1", "anon-1")
    # Nothing went upstream and nothing was finished.
    assert not [r for r in httpx.get(fake_provider.base_url + "/_fake/requests", timeout=10).json() if mark in json.dumps(r["body"])]
    assert gw.events_for(trace, "CompletionsFinished") == []


def test_blocked_requests_spend_no_quota(gw: WiredGateway) -> None:
    for _ in range(3):  # actor-b may make one chat request an hour
        assert call(gw, "openai", f"{PREAMBLE} {BLOCKED}", token=TOKEN_B).status_code == 400
    assert call(gw, "openai", f"{PREAMBLE} fine", token=TOKEN_B).status_code == 200
    assert call(gw, "openai", f"{PREAMBLE} fine", token=TOKEN_B).status_code == 429


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_flagged_not_blocked_is_served_and_marked(gw: WiredGateway, name: str) -> None:
    response = call(gw, name, "no preamble here", feature="code_completions" if name != "openai" else None)
    assert response.status_code == 200, response.text
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert meta["flagged"] is True
    # A static actor is not one of Sourcegraph's own users: no prompt text in events.
    assert meta["flagging_result"] == {"reason": ["unknown_prompt"], "should_block": False}
    clean = call(gw, name, f"{PREAMBLE}: hello", feature="code_completions" if name != "openai" else None)
    assert "flagged" not in gw.event_for(clean.headers["X-Trace"])["metadata"]


def test_token_limits_apply_to_tokenized_providers(gw: WiredGateway) -> None:
    long_prompt = PREAMBLE + " word" * 70
    for name in ("anthropic", "anthropic-messages"):
        response = call(gw, name, long_prompt)
        assert_json_error(response, 400, "We blocked your request")
        meta = gw.event_for(response.headers["X-Trace"], "RequestBlocked")["metadata"]
        assert meta["flagging_result"]["reason"] == ["high_prompt_token_count"]
        assert meta["prompt_token_count"] > 60
    # Providers the reference does not tokenize are not token-checked.
    assert call(gw, "openai", long_prompt).status_code == 200
    response = call(gw, "google", long_prompt, max_tokens=501)
    meta = gw.event_for(response.headers["X-Trace"], "RequestBlocked")["metadata"]
    assert meta["flagging_result"]["reason"] == ["high_max_tokens_to_sample"] and meta["prompt_token_count"] is None


def test_dotcom_prompts_are_recorded_and_listed(gw: WiredGateway) -> None:
    mark = marker()
    response = call(gw, "openai", f"tell me a secret {mark}", token=DOTCOM_TOKEN)
    assert response.status_code == 200, response.text
    trace = response.headers["X-Trace"]
    event = gw.event_for(trace)
    user_id = event["identifier"]
    assert event["source"] == "dotcom-user"
    assert event["metadata"]["flagging_result"]["prompt_prefix"] == f"tell me a secret {mark}\n"
    key = f"prompt:{trace}:chat_completions:{user_id}"

    def listed() -> list[dict[str, str]]:
        return diag(gw, "/-/flagged-requests").json()["prompts"]

    wait_until(lambda: any(p["key"] == key for p in listed()), 10, what="recorded prompt")
    assert {"key": key, "traceId": trace, "feature": "chat_completions", "userId": user_id} in listed()
    prompt = diag(gw, "/-/flagged-requests/" + quote(key, safe=""))
    assert prompt.status_code == 200 and prompt.headers["content-type"].startswith("text/plain")
    assert prompt.text == f"tell me a secret {mark}\n"
    # Code completions are never recorded; static actors are not recorded.
    code = call(gw, "fireworks", f"no preamble {marker()}", token=DOTCOM_TOKEN, feature="code_completions")
    static = call(gw, "openai", f"no preamble {marker()}")
    keys = [p["key"] for p in listed()]
    assert not any(code.headers["X-Trace"] in k or static.headers["X-Trace"] in k for k in keys)


def test_listing_is_behind_the_diagnostics_secret(gw: WiredGateway) -> None:
    assert_json_error(diag(gw, "/-/flagged-requests", secret=None), 401)
    assert_json_error(diag(gw, "/-/flagged-requests", secret="wrong"), 401)
    assert_json_error(diag(gw, "/-/flagged-requests/prompt:x:y:z", secret="wrong"), 401)
    assert_json_error(diag(gw, "/-/flagged-requests/invalid-prompt-key"), 400, "Invalid prompt key")
    assert_json_error(diag(gw, "/-/flagged-requests/prompt:404"), 404, "Prompt not found")


def test_full_prompt_for_listed_dotcom_actors(start_wired: Any, graphql: FakeGraphQLThread) -> None:
    # The dotcom actor id is the user's id (4242); only listed ids get full prompts.
    gw = start_wired(env={**dotcom_env(graphql), "CODY_GATEWAY_IDENTIFIERS_TO_LOG_FOR": "4242"})
    listed = call(gw, "openai", "the whole prompt", token=DOTCOM_TOKEN)
    meta = gw.event_for(listed.headers["X-Trace"])["metadata"]
    assert meta["full_prompt"] == "the whole prompt\n"
    assert "flagged" not in meta  # default config: nothing to flag
    other = call(gw, "openai", "the whole prompt", token=TOKEN_B)
    assert "full_prompt" not in gw.event_for(other.headers["X-Trace"])["metadata"]


def test_recorder_and_listing_on_redis(start_wired: Any, graphql: FakeGraphQLThread, redis_server: Any) -> None:
    client = redis.Redis.from_url(redis_server.url)
    for i in (1, 2, 3):
        client.set(f"prompt:trace-id-{i}:code_completions:user-id-{i}", f"prompt message {i}")
    client.set("unrelated", "x")
    client.set("prompt:malformed", "x")
    gw = start_wired(env={**FLAGGING_ENV, **dotcom_env(graphql), "REDIS_ENDPOINT": redis_server.url})
    listed = diag(gw, "/-/flagged-requests").json()["prompts"]
    assert [p["traceId"] for p in listed] == ["trace-id-1", "trace-id-2", "trace-id-3"]
    assert listed[2] == {"key": "prompt:trace-id-3:code_completions:user-id-3",
                         "traceId": "trace-id-3", "feature": "code_completions", "userId": "user-id-3"}
    got = diag(gw, "/-/flagged-requests/" + quote("prompt:trace-id-3:code_completions:user-id-3", safe=""))
    assert got.status_code == 200 and got.text == "prompt message 3"

    response = call(gw, "anthropic-messages", "dubious", token=DOTCOM_TOKEN)
    assert response.status_code == 200
    trace = response.headers["X-Trace"]
    user_id = gw.event_for(trace)["identifier"]
    key = f"prompt:{trace}:chat_completions:{user_id}"
    wait_until(lambda: client.get(key) is not None, 10, what="prompt in Redis")
    assert client.get(key) == b"Human: dubious\n\n"
    assert 3500 < client.ttl(key) <= 3600  # CODY_GATEWAY_DOTCOM_FLAGGED_PROMPT_RECORDER_TTL, 1h by default
    client.close()


def test_circuit_breaker_opens_after_min_samples_and_health_reports_it(start_wired: Any) -> None:
    gw = start_wired(env={"CODY_GATEWAY_UPSTREAM_CIRCUIT_MIN_SAMPLES": "4", "CODY_GATEWAY_UPSTREAM_RETRY_MAX_ATTEMPTS": "1"})
    # One lone failure does not take the model down (SPEC point 8).
    assert call(gw, "google", "fake:status=500").status_code == 500
    assert call(gw, "google", "hello").status_code == 200
    for _ in range(3):
        assert call(gw, "google", "fake:status=500").status_code == 500
    # 4 failures in 5 attempts is below 0.95: failures must pile up to 19 in 20 before it opens.
    statuses = [call(gw, "google", "fake:status=504").status_code for _ in range(60)]
    assert 503 in statuses
    first_open = statuses.index(503)
    assert all(s == 503 for s in statuses[first_open:])
    response = call(gw, "google", "hello")
    body = assert_json_error(response, 503, "model google/gemini-pro is currently unavailable")
    assert body and response.headers["Retry-After"] == "3"
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert (meta["upstream_status_code"], meta["resolved_status_code"]) == (None, 503)
    # Other models and providers are unaffected.
    assert call(gw, "openai", "hello").status_code == 200
    health = diag(gw, "/-/healthz").json()
    circuits = health["circuits"]
    assert circuits["open"] == ["google/gemini-pro"]
    assert circuits["models"]["google/gemini-pro"]["state"] == "open"
    assert circuits["models"]["openai/gpt-4"]["state"] == "closed"
    assert health["status"] == "ok"
