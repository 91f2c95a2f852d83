"""Anthropic Messages at full fidelity (issue 15) through the real gateway, with the
official SDK as client and the fake provider recording what reached the upstream."""

# The fixtures imported from tests.providers_support are parameters of the tests.

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import anthropic
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conf.loader import load_config
from errors import BadRequest
from fakes.provider import THINKING_SIGNATURE, TOOL_INPUT
from tests.conftest import TOKEN_A, TOKEN_B, actor, limits
from tests.providers_support import (  # noqa: F401  (fixtures)
    WiredGateway,
    gw,
    marker,
    post,
    received,
    start_module_wired,
)
from upstreams.anthropic_messages import AnthropicMessagesProvider
from upstreams.base import Provider
from upstreams.google import GoogleProvider
from upstreams.openai_chat import OpenAIChatProvider

pytestmark = pytest.mark.timeout(120)

MODEL = "claude-sonnet-4-6"
ROUTE = "/v1/completions/anthropic-messages"
WEATHER_TOOL: anthropic.types.ToolParam = {
    "name": "get_weather",
    "description": "Weather at a place",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    "cache_control": {"type": "ephemeral"},
}
PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


@pytest.fixture(scope="module")
def shared(start_module_wired: Any) -> WiredGateway:
    sonnet_only = actor(
        "actor-b",
        TOKEN_B,
        chat_completions=limits(models=["anthropic/claude-sonnet-*", "openai/gpt-5*"]),
    )
    return start_module_wired(actors=[actor("actor-a", TOKEN_A), sonnet_only])


def sdk(gw: WiredGateway, token: str = TOKEN_A, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url + "/anthropic", api_key=token, max_retries=0, **kwargs)


def sent_to_upstream(fake_provider: Any, mark: str, path: str = "/v1/messages") -> dict[str, Any]:
    return [r for r in received(fake_provider.base_url, mark) if r["path"] == path][-1]


# -- tools ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_tool_use_round_trip(gw: WiredGateway, fake_provider: Any, stream: bool) -> None:
    mark = marker()
    client = sdk(gw)
    messages: list[Any] = [{"role": "user", "content": f"weather in Paris? {mark} fake:tool_use=get_weather fake:tokens=3"}]
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 1024,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "messages": messages,
    }
    if stream:
        with client.messages.stream(**kwargs) as s:
            first = s.get_final_message()
    else:
        first = client.messages.create(**kwargs)
    assert first.stop_reason == "tool_use"
    tool_use = first.content[-1]
    assert tool_use.type == "tool_use" and tool_use.name == "get_weather"
    assert tool_use.input == TOOL_INPUT  # assembled by the SDK from input_json_delta when streamed
    sent = sent_to_upstream(fake_provider, mark)["body"]
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}

    mark2 = marker()
    tool_result = {
        "type": "tool_result",
        "tool_use_id": tool_use.id,
        "content": [{"type": "text", "text": f"18 degrees {mark2}"}, {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1PX}}],
        "is_error": False,
    }
    history: list[Any] = [*messages, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]}, {"role": "user", "content": [tool_result]}]
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=1024, tools=[WEATHER_TOOL], messages=history)
    second = raw.parse()
    assert second.content[0].type == "text"
    sent2 = sent_to_upstream(fake_provider, mark2)["body"]
    assert sent2["messages"][2]["content"] == [tool_result]
    assistant_blocks = sent2["messages"][1]["content"]
    assert assistant_blocks[-1]["type"] == "tool_use" and assistant_blocks[-1]["input"] == TOOL_INPUT
    meta = gw.event_for(raw.headers["X-Trace"])["metadata"]
    assert meta["outcome"] == "complete" and meta["completion_token_count"] == second.usage.output_tokens
    # The tool result's text is part of the prompt the gateway reads (flagging, tokenizer fallback).
    assert meta["prompt_character_count"] >= len(f"18 degrees {mark2}")


def test_image_and_document_blocks_pass_unchanged(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    blocks: list[Any] = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1PX}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "document", "source": {"type": "url", "url": "https://example.com/paper.pdf"}, "title": "Paper", "citations": {"enabled": True}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain doc"}, "cache_control": {"type": "ephemeral"}},
        {"type": "document", "source": {"type": "file", "file_id": "file_011"}},
        {"type": "search_result", "source": "https://example.com", "title": "t", "content": [{"type": "text", "text": "found"}]},
        {"type": "text", "text": f"describe these {mark}"},
    ]
    message = sdk(gw).messages.create(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": blocks}])
    assert message.content[0].type == "text"
    assert sent_to_upstream(fake_provider, mark)["body"]["messages"] == [{"role": "user", "content": blocks}]


def test_cache_control_and_cache_usage_recorded_apart(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    system: list[Any] = [
        {"type": "text", "text": "You are Cody."},
        {"type": "text", "text": "A long shared context.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ]
    content: list[Any] = [{"type": "text", "text": f"hi {mark} fake:tokens=4 fake:cache_read=100 fake:cache_creation=50", "cache_control": {"type": "ephemeral"}}]
    raw = sdk(gw).messages.with_raw_response.create(
        model=MODEL, max_tokens=100, system=system, cache_control={"type": "ephemeral"}, messages=[{"role": "user", "content": content}]
    )
    message = raw.parse()
    assert message.usage.cache_read_input_tokens == 100 and message.usage.cache_creation_input_tokens == 50
    sent = sent_to_upstream(fake_provider, mark)["body"]
    assert sent["system"] == system  # with cache_control: forwarded as a list, as sent
    assert sent["messages"][0]["content"] == content
    assert sent["cache_control"] == {"type": "ephemeral"}
    meta = gw.event_for(raw.headers["X-Trace"])["metadata"]
    assert meta["prompt_cache_read_token_count"] == 100
    assert meta["prompt_cache_creation_token_count"] == 50
    assert meta["prompt_token_count"] == message.usage.input_tokens + 150
    assert meta["completion_reasoning_token_count"] is None


def test_streamed_cache_usage_counted_once(gw: WiredGateway) -> None:
    mark = marker()
    with sdk(gw).messages.stream(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": f"{mark} fake:tokens=5 fake:cache_read=30"}]
    ) as s:
        final = s.get_final_message()
        trace = s.response.headers["X-Trace"]
    meta = gw.event_for(trace)["metadata"]
    assert meta["prompt_cache_read_token_count"] == 30 and meta["prompt_cache_creation_token_count"] is None
    assert meta["prompt_token_count"] == final.usage.input_tokens + 30
    assert meta["completion_token_count"] == 5


# -- thinking and betas ---------------------------------------------------------------


def test_extended_thinking_with_16k_max_tokens_and_an_allowed_beta(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    client = sdk(gw, default_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"})
    with client.messages.stream(
        model=MODEL,
        max_tokens=16000,
        thinking={"type": "enabled", "budget_tokens": 10000},
        messages=[{"role": "user", "content": f"think {mark} fake:thinking=1 fake:tokens=4"}],
    ) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    thinking = final.content[0]
    assert thinking.type == "thinking" and thinking.signature == THINKING_SIGNATURE
    sent = sent_to_upstream(fake_provider, mark)
    assert sent["body"]["max_tokens"] == 16000
    assert sent["body"]["thinking"] == {"type": "enabled", "budget_tokens": 10000}
    assert sent["headers"]["anthropic-beta"] == "interleaved-thinking-2025-05-14"

    # The thinking block goes back unchanged (signature intact) on the next turn.
    mark2 = marker()
    history: list[Any] = [
        {"role": "user", "content": "think"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
        {"role": "user", "content": f"and then? {mark2}"},
    ]
    client.messages.create(model=MODEL, max_tokens=16000, thinking={"type": "adaptive"}, messages=history)
    sent2 = sent_to_upstream(fake_provider, mark2)["body"]
    assert sent2["messages"][1]["content"][0] == {"type": "thinking", "thinking": thinking.thinking, "signature": THINKING_SIGNATURE}
    assert sent2["thinking"] == {"type": "adaptive"}


def test_refused_beta_is_a_400_naming_it(gw: WiredGateway) -> None:
    client = sdk(gw, default_headers={"anthropic-beta": "prompt-caching-2024-07-31, made-up-beta-2030-01-01"})
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert "made-up-beta-2030-01-01" in str(caught.value) and "not allowed" in str(caught.value)
    body = caught.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"


def test_thinking_budget_must_be_below_max_tokens(gw: WiredGateway) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(gw).messages.create(
            model=MODEL, max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 4000}, messages=[{"role": "user", "content": "hi"}]
        )
    assert "budget_tokens must be less than max_tokens" in str(caught.value)


# -- max_tokens caps -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "ok", "too_many"),
    [("claude-sonnet-4-6", 64000, 64001), ("claude-3-haiku-20240307", 4096, 4097), ("claude-opus-4-6", 128000, 128001)],
)
def test_max_tokens_caps_per_model(gw: WiredGateway, model: str, ok: int, too_many: int) -> None:
    body = {"model": model, "max_tokens": ok, "messages": [{"role": "user", "content": "hi fake:tokens=1"}]}
    assert post(gw, ROUTE, body).status_code == 200
    response = post(gw, ROUTE, {**body, "max_tokens": too_many})
    assert response.status_code == 400
    assert response.json()["error"] == f"max_tokens exceeds maximum allowed value of {ok}: {too_many}"


# -- top-level fields, unknown fields, malformed blocks -----------------------------------------


def test_top_level_fields_forwarded_and_unknown_dropped(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    body = {
        "model": MODEL,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": mark}],
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "service_tier": "auto",
        "metadata": {"user_id": "client-chosen"},
        "inference_geo": "us",
        "output_config": {"effort": "high"},
        "some_future_field": {"x": 1},
    }
    assert post(gw, ROUTE, body, headers={"X-Sourcegraph-Actor-UID": "9"}).status_code == 200
    sent = sent_to_upstream(fake_provider, mark)["body"]
    assert sent["metadata"] == {"user_id": "actor-a:9"}  # the gateway's, as in the reference
    for key in ("stop_sequences", "temperature", "top_p", "top_k", "service_tier", "inference_geo", "output_config"):
        assert sent[key] == body[key], key
    assert "some_future_field" not in sent


@pytest.mark.parametrize(
    ("content", "path"),
    [
        (["just a string"], "messages[0].content[0]"),
        ([{"type": 7}], "messages[0].content[0].type"),
        ([{"type": "text", "text": 5}], "messages[0].content[0].text"),
        ([{"type": "image", "source": {}, "cache_control": "yes"}], "messages[0].content[0].cache_control"),
        ({"type": "text"}, "messages[0].content"),
    ],
)
def test_malformed_block_is_a_400_naming_its_path(gw: WiredGateway, content: Any, path: str) -> None:
    response = post(gw, ROUTE, {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400, response.text
    assert path in response.json()["error"]


def test_deep_or_huge_blocks_are_400_or_413_never_500(gw: WiredGateway) -> None:
    deep: Any = {"type": "object"}
    for _ in range(300):
        deep = {"nested": deep}
    tool = {"name": "t", "input_schema": deep}
    response = post(gw, ROUTE, {"model": MODEL, "max_tokens": 10, "tools": [tool], "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400 and "tools" in response.json()["error"]
    block = {"type": "tool_result", "tool_use_id": "x", "content": [{"type": "text", "text": "y"}], "extra": deep}
    response = post(gw, ROUTE, {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": [block]}]})
    assert response.status_code == 400 and "messages[0].content[0]" in response.json()["error"]
    many = [{"type": "text", "text": "x"}] * 10_001
    response = post(gw, ROUTE, {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": many}]})
    assert response.status_code == 400
    huge = "x" * (11 << 20)
    response = httpx.post(
        gw.base_url + ROUTE,
        content=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": huge}]}).encode(),
        headers={"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"},
        timeout=30,
    )
    assert response.status_code == 413


# -- a text-only request is byte-identical to the reference's ---------------------------------------


# Upstream bodies the gateway sent for these requests before issue 15 (captured from
# the previous implementation): the exact bytes must not change.
TEXT_ONLY_CASES: list[tuple[dict[str, Any], bytes]] = [
    (
        {"model": "claude-3-haiku-20240307", "max_tokens": 20, "temperature": 0, "stream": True,
         "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]},
        (
            b'{"messages":[{"role":"user","content":"hello"},{"role":"assistant","content":"hi"},{"role":"user","content":"more"}],'
            b'"model":"claude-3-haiku-20240307","max_tokens":20,"temperature":0,"stream":true,"metadata":{"user_id":"actor:uid"}}'
        ),
    ),
    (
        {"model": "anthropic/claude-3-haiku-20240307", "max_tokens": 20, "top_k": 3, "top_p": 0.5, "stop_sequences": ["x"],
         "metadata": {"user_id": "mine"}, "unknown": 1, "system": [{"type": "text", "text": "A"}, {"text": "B"}],
         "messages": [{"role": "system", "content": [{"type": "text", "text": "You are Cody"}]},
                      {"role": "user", "content": [{"text": "hello", "type": "text"}]}]},
        (
            b'{"messages":[{"role":"user","content":[{"type":"text","text":"hello"}]}],"model":"claude-3-haiku-20240307",'
            b'"max_tokens":20,"top_p":0.5,"top_k":3,"stop_sequences":["x"],"metadata":{"user_id":"actor:uid"},'
            b'"system":"AB\\n\\nYou are Cody"}'
        ),
    ),
]


@pytest.mark.parametrize(("request_body", "expected"), TEXT_ONLY_CASES)
def test_text_only_upstream_request_is_byte_identical(request_body: dict[str, Any], expected: bytes) -> None:
    config = load_config(environ={"CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": "k"})
    provider = AnthropicMessagesProvider(config.providers.anthropic, max_messages=100)
    call = provider.parse(json.dumps(request_body).encode(), feature="chat_completions", identifier="actor:uid", headers={})
    assert call.upstream_request().body == expected
    # The reference's headers, plus the identity encoding the transport always asked for (issue 17 item 11).
    assert dict(call.upstream_request().headers) == {
        "Content-Type": "application/json", "X-API-Key": "k", "anthropic-version": "2023-06-01", "Accept-Encoding": "identity",
    }  # fmt: skip


# -- models and token counting ----------------------------------------------------------------


def test_models_list_is_filtered_by_the_actor(gw: WiredGateway) -> None:
    everything = [m.id for m in sdk(gw).models.list(limit=5)]  # auto-paginates with after_id
    assert "claude-sonnet-4-6" in everything and "claude-3-haiku-20240307" in everything
    assert len(everything) == len(set(everything))
    sonnets = [m.id for m in sdk(gw, TOKEN_B).models.list()]
    assert sonnets and all(m.startswith("claude-sonnet-") for m in sonnets)
    one = sdk(gw, TOKEN_B).models.retrieve("claude-sonnet-4-6")
    assert one.id == "claude-sonnet-4-6" and one.max_tokens == 64000
    with pytest.raises(anthropic.NotFoundError):
        sdk(gw, TOKEN_B).models.retrieve("claude-3-haiku-20240307")


def test_count_tokens_is_forwarded_and_not_charged(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    client = sdk(gw)
    counted = client.messages.count_tokens(
        model=MODEL, system="be brief", tools=[WEATHER_TOOL], messages=[{"role": "user", "content": f"one two three {mark}"}]
    )
    assert counted.input_tokens == 2 + 4  # the fake counts words of system and messages
    sent = sent_to_upstream(fake_provider, mark, "/v1/messages/count_tokens")
    assert sent["body"]["tools"] == [WEATHER_TOOL] and "metadata" not in sent["body"]
    assert not [e for e in gw.events("CompletionsFinished") if mark in json.dumps(e)]
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(gw, TOKEN_B).messages.count_tokens(model="claude-3-haiku-20240307", messages=[{"role": "user", "content": "x"}])
    assert "is not allowed" in str(caught.value)
    with pytest.raises(anthropic.AuthenticationError):
        sdk(gw, "sgd_" + "9" * 64).messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_sdk_exception_carries_the_gateway_message(gw: WiredGateway) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(gw, TOKEN_B).messages.create(model="claude-3-haiku-20240307", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert 'model "anthropic/claude-3-haiku-20240307" is not allowed' in str(caught.value)


# -- hostile shapes: parse raises a 400 or succeeds, never anything else --------------------------


_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["type", "text", "source", "content", "input", "cache_control", "parts", "image_url", "tool_calls", "x"]), children, max_size=4),
    max_leaves=30,
)
_block = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking", "document", "x" * 70])}, optional={"text": _json, "content": _json, "cache_control": _json, "input": _json})


def _nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {"a": value}
    return value


_CONFIG = load_config(environ={"CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": "k", "CODY_GATEWAY_OPENAI_ACCESS_TOKEN": "k", "CODY_GATEWAY_GOOGLE_ACCESS_TOKEN": "k"})
_PARSERS: tuple[Provider, ...] = (
    AnthropicMessagesProvider(_CONFIG.providers.anthropic, max_messages=100),
    OpenAIChatProvider(_CONFIG.providers.openai, max_messages=100),
    GoogleProvider(_CONFIG.providers.google, max_messages=100),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=st.one_of(_json, st.lists(_block | _json, max_size=5)),
    top=st.dictionaries(st.sampled_from(["tools", "tool_choice", "thinking", "system", "response_format", "generationConfig", "toolConfig", "max_tokens", "n"]), _json, max_size=4),
    depth=st.sampled_from([0, 10, 70, 300]),
)
def test_hostile_shapes_are_a_400_or_forwarded(content: Any, top: dict[str, Any], depth: int) -> None:
    if depth:
        top = {**top, "tools": [{"name": "t", "input_schema": _nested(depth)}]}
    bodies = (
        {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": content}], **top},
        {"model": "gpt-4", "messages": [{"role": "user", "content": content}], **top},
        {"model": "gemini-pro", "contents": [{"parts": content if isinstance(content, list) else [content]}], **top},
    )
    for provider, body in zip(_PARSERS, bodies):
        try:
            call = provider.parse(json.dumps(body).encode(), feature="chat_completions", identifier="a:b", headers={})
        except BadRequest:
            continue
        assert isinstance(json.loads(call.upstream_request().body), dict)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    params=st.dictionaries(st.sampled_from(["limit", "after_id", "before_id", "x"]), st.text(max_size=12), max_size=3),
    model_id=st.text(min_size=1, max_size=40),
    body=st.one_of(_json, st.fixed_dictionaries({"model": st.sampled_from([MODEL, "nope"]), "messages": _json})),
)
def test_models_and_count_tokens_never_500(gw: WiredGateway, params: dict[str, str], model_id: str, body: Any) -> None:
    headers = {"x-api-key": TOKEN_A}
    listing = httpx.get(gw.base_url + "/anthropic/v1/models", params=params, headers=headers, timeout=10)
    assert listing.status_code in (200, 400), listing.text
    one = httpx.get(gw.base_url + "/anthropic/v1/models/" + quote(model_id, safe=""), headers=headers, timeout=10)
    assert one.status_code in (200, 400, 404), one.text
    assert httpx.get(gw.base_url + "/openai/v1/models", headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=10).status_code == 200
    counted = httpx.post(gw.base_url + "/anthropic/v1/messages/count_tokens", content=json.dumps(body).encode(), headers=headers, timeout=10)
    assert counted.status_code in (200, 400), counted.text
    if counted.status_code == 400:
        assert counted.json()["type"] == "error"
