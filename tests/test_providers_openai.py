"""OpenAI chat through the real gateway: the official SDK on the SDK-compatible route,
the Sourcegraph route, and what the provider receives."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TOKEN_A, actor, limits
from tests.providers_support import (  # noqa: F401  (fixtures)
    WiredGateway,
    assert_json_error,
    gw,
    marker,
    post,
    received,
    sse_data,
    start_module_wired,
    start_wired,
)

pytestmark = pytest.mark.timeout(90)

ROUTE = "/v1/completions/openai"
OPENAI_KEY = "sk-openai-upstream-secret"


@pytest.fixture(scope="module")
def shared(start_module_wired: Any) -> WiredGateway:
    return start_module_wired()


def sdk(gw: WiredGateway, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/openai/v1", api_key=TOKEN_A, max_retries=0, **kwargs)


def test_sdk_streams_chat_through_the_same_pipeline(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    direct = openai.OpenAI(base_url=fake_provider.base_url + "/v1", api_key="x", max_retries=0)
    messages: list[Any] = [{"role": "user", "content": f"stream please {mark} fake:tokens=9"}]
    expected = "".join(
        c.choices[0].delta.content or ""
        for c in direct.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
        if c.choices
    )
    with sdk(gw).chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}
    ) as response:
        trace = response.headers["X-Trace"]
        assert response.headers["X-Cody-Resolved-Model"] == "openai/gpt-4o"
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected and len(text.split()) == 9
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 9

    meta = gw.event_for(trace)["metadata"]
    assert meta["model"] == "openai/gpt-4o" and meta["provider"] == "openai" and meta["feature"] == "chat_completions"
    assert meta["stream"] is True and meta["outcome"] == "complete"
    assert meta["completion_token_count"] == 9 and meta["prompt_token_count"] == usage.prompt_tokens
    assert meta["completion_character_count"] == len(text)
    assert (meta["upstream_status_code"], meta["resolved_status_code"]) == (200, 200)
    sent = received(fake_provider.base_url, mark)[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"


def test_sdk_non_streamed_chat(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    raw = sdk(gw).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": f"once {mark} fake:tokens=4"}], max_tokens=50
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the fake"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    meta = gw.event_for(raw.headers["X-Trace"])["metadata"]
    assert meta["stream"] is False and meta["completion_token_count"] == 4
    assert meta["prompt_token_count"] == completion.usage.prompt_tokens
    # The reference counted 0 here (it read a field that does not exist).
    assert meta["completion_character_count"] == len("Hello from the fake")


def test_stream_without_usage_asked_is_counted_by_the_provider(gw: WiredGateway, fake_provider: Any) -> None:
    # Issue 15 changed this: the gateway always asks the upstream for stream usage
    # (the event gets the provider's exact counts) and hides the usage chunk from
    # a client that did not ask for it.
    mark = marker()
    response = post(gw, ROUTE, {"model": "gpt-4", "stream": True, "messages": [{"role": "user", "content": f"{mark} fake:tokens=6"}]})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert sse_data(response.text)[-1] == "[DONE]"
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert meta["completion_token_count"] == 6 and meta["completion_tokenizer_token_count"] is None
    assert meta["prompt_token_count"] > 0
    assert received(fake_provider.base_url, mark)[-1]["body"]["stream_options"] == {"include_usage": True}


def test_request_is_transformed(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    body = {
        "model": "gpt-4",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": mark}], "name": "bob"}],
        "n": 3,
        "temperature": 0,
        "stop": "END",
        "user": "client-chosen",
        "logit_bias": {"50256": -100},
        "tools": [{"type": "function", "function": {"name": "x"}}],
        "response_format": {"type": "json_object"},
        "unknown": 1,
    }
    response = post(gw, ROUTE, body, headers={"X-Sourcegraph-Actor-UID": "uid-7"})
    assert response.status_code == 200, response.text
    sent = received(fake_provider.base_url, mark)[-1]
    assert sent["body"] == {
        "model": "gpt-4",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": mark}], "name": "bob"}],
        "temperature": 0,
        "n": 1,
        "stop": "END",
        "logit_bias": {"50256": -100},
        "user": "actor-a:uid-7",
        # Forwarded since issue 15 (the reference dropped them).
        "tools": [{"type": "function", "function": {"name": "x"}}],
        "response_format": {"type": "json_object"},
    }
    assert sent["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "openai-organization" not in sent["headers"]


def test_organization_header(start_wired: Any, fake_provider: Any) -> None:
    gw = start_wired(env={"CODY_GATEWAY_OPENAI_ORG_ID": "org-123"})
    mark = marker()
    assert post(gw, ROUTE, {"model": "gpt-4", "messages": [{"role": "user", "content": mark}]}).status_code == 200
    assert received(fake_provider.base_url, mark)[-1]["headers"]["openai-organization"] == "org-123"


def test_validation(gw: WiredGateway) -> None:
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
    assert_json_error(post(gw, ROUTE, body, feature="code_completions"), 400, 'feature "code_completions" is currently not supported for OpenAI')
    assert_json_error(post(gw, ROUTE, {**body, "model": "gpt-4-32k"}), 400, 'model "openai/gpt-4-32k" is not allowed, allowed: [openai/gpt-4, ')
    assert_json_error(post(gw, ROUTE, {**body, "max_tokens": "ten"}), 400, "failed to parse request body")
    # Issue 15: image_url parts are forwarded now; a part must still be an object.
    assert_json_error(post(gw, ROUTE, {**body, "messages": [{"role": "user", "content": ["image"]}]}), 400, "messages[0].content[0]")
    # The SDK route defaults the feature to chat; the Sourcegraph route requires it.
    assert_json_error(post(gw, ROUTE, body, feature=None), 400, "X-Sourcegraph-Feature header is required")
    assert post(gw, "/openai/v1/chat/completions", body, feature=None).status_code == 200


def test_gateway_errors_reach_the_sdk_as_its_error_classes(start_wired: Any) -> None:
    gw = start_wired([actor("tiny", TOKEN_A, chat_completions=limits(1, "1h"))])
    client = sdk(gw)
    client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "one"}])
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "two"}])
    # SPEC point 1: the gateway's own errors are {"error": "<message>"}.
    assert "rate limit of 1 requests" in info.value.response.json()["error"]["message"]
    assert "rate limit of 1 requests" in str(info.value)
    assert int(info.value.response.headers["Retry-After"]) >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.base_url + "/openai/v1", api_key="sgd_" + "f" * 64, max_retries=0).chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "x"}]
        )
    assert httpx.get(gw.base_url + "/openai/v1/chat/completions", timeout=10).status_code in (401, 403, 405)
