"""OpenAI chat (and Fireworks chat) at full fidelity (issue 15) through the real gateway,
with the official SDK as client and the fake provider recording the upstream requests."""

# The fixtures imported from tests.providers_support are parameters of the tests.

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam

from fakes.provider import TOOL_INPUT
from tests.conftest import TOKEN_A, TOKEN_B, actor, limits
from tests.providers_support import (  # noqa: F401  (fixtures)
    WiredGateway,
    gw,
    marker,
    post,
    received,
    sse_data,
    start_module_wired,
)
from upstreams.base import CallInfo, UpstreamRequest
from upstreams.openai_chat import OpenAIChatCall

pytestmark = pytest.mark.timeout(120)

MODEL = "gpt-5.5"
TOOLS: list[ChatCompletionFunctionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather at a place",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
            "strict": True,
        },
    }
]
IMAGE = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


@pytest.fixture(scope="module")
def shared(start_module_wired: Any) -> WiredGateway:
    gpt5_only = actor("actor-b", TOKEN_B, chat_completions=limits(models=["openai/gpt-5*"]))
    return start_module_wired(actors=[actor("actor-a", TOKEN_A), gpt5_only])


def sdk(gw: WiredGateway, token: str = TOKEN_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/openai/v1", api_key=token, max_retries=0)


def upstream_body(fake_provider: Any, mark: str) -> dict[str, Any]:
    return received(fake_provider.base_url, mark)[-1]["body"]


def test_tools_round_trip(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    client = sdk(gw)
    messages: list[Any] = [{"role": "user", "content": f"weather? {mark} fake:tool_use=get_weather fake:tokens=2"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)
    tool_calls = first.choices[0].message.tool_calls
    assert tool_calls is not None
    call = tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and json.loads(call.function.arguments) == TOOL_INPUT
    sent = upstream_body(fake_provider, mark)
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False

    mark2 = marker()
    history: list[Any] = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": f"18 degrees {mark2}"},
    ]
    stream = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    sent2 = upstream_body(fake_provider, mark2)
    assert sent2["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}
    assert sent2["messages"][2] == {"role": "tool", "content": f"18 degrees {mark2}", "tool_call_id": call.id}


def test_streamed_tool_call_is_assembled_by_the_sdk(gw: WiredGateway) -> None:
    stream = sdk(gw).chat.completions.create(
        model=MODEL, stream=True, tools=TOOLS, messages=[{"role": "user", "content": "w fake:tool_use=get_weather fake:tokens=1"}]
    )
    calls = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    function = calls[0].function if calls else None
    assert function is not None and function.arguments is not None and json.loads(function.arguments) == TOOL_INPUT


def test_response_format_reasoning_and_other_fields_forwarded(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "string"}}}},
    }
    sdk(gw).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": mark}],
        response_format=response_format,
        reasoning_effort="high",
        seed=7,
        logprobs=True,
        top_logprobs=2,
        max_completion_tokens=300,
        stop=["END"],
        prediction={"type": "content", "content": "predicted"},
        n=3,
    )
    sent = upstream_body(fake_provider, mark)
    assert sent["response_format"] == response_format
    assert (sent["reasoning_effort"], sent["seed"], sent["logprobs"], sent["top_logprobs"]) == ("high", 7, True, 2)
    assert sent["max_completion_tokens"] == 300 and sent["stop"] == ["END"]
    assert sent["prediction"] == {"type": "content", "content": "predicted"}
    assert sent["n"] == 1  # capped as in the reference


def test_content_parts_pass_unchanged(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    parts: list[Any] = [
        {"type": "text", "text": f"what is this? {mark}"},
        {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
    ]
    sdk(gw).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}])
    assert upstream_body(fake_provider, mark)["messages"] == [{"role": "user", "content": parts}]


def test_stream_without_usage_asked_hides_the_usage_chunk_and_counts_exactly(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": f"{mark} fake:tokens=5 fake:reasoning_tokens=7"}]}
    response = post(gw, "/openai/v1/chat/completions", body, feature=None)
    assert response.status_code == 200, response.text
    events = sse_data(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    # What the client would have seen without the gateway's include_usage: no usage anywhere.
    assert all("usage" not in c for c in chunks), chunks[-1]
    assert all(c["choices"] for c in chunks)
    assert upstream_body(fake_provider, mark)["stream_options"] == {"include_usage": True}
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert meta["completion_token_count"] == 5 + 7  # the provider's count, hidden reasoning included
    assert meta["completion_reasoning_token_count"] == 7
    assert meta["completion_tokenizer_token_count"] is None


def test_stream_with_usage_asked_relays_it(gw: WiredGateway) -> None:
    stream = sdk(gw).chat.completions.create(
        model=MODEL,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "x fake:tokens=3 fake:cache_read=2"}],
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    details = chunks[-1].usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == 2


def test_usage_chunk_filter_keeps_whole_events_across_chunk_boundaries() -> None:
    call = OpenAIChatCall(
        UpstreamRequest("u", {}, b"{}"), CallInfo(model="m", stream=True), None, prompt_chars=0, prompt_text=""
    )
    call.strip_usage = True
    stream = (
        b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}\n\n'
        b'data: {"id":"1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
        b'data: {"id":"1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
        b"data: [DONE]\n\n"
    )
    relayed = b""
    for i in range(0, len(stream), 7):
        out = call.feed(stream[i : i + 7])
        relayed += stream[i : i + 7] if out is None else out
    call.finish()
    assert relayed == (
        b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
        b'data: {"id":"1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    usage = call.usage()
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 1)


def test_models_list_is_filtered_by_the_actor(gw: WiredGateway) -> None:
    everything = [m.id for m in sdk(gw).models.list()]
    assert "gpt-5.5" in everything and "gpt-4" in everything and "gpt-4o" in everything
    gpt5 = [m.id for m in sdk(gw, TOKEN_B).models.list()]
    assert gpt5 and all(m.startswith("gpt-5") for m in gpt5)


def test_sdk_exception_carries_the_gateway_message(gw: WiredGateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gw, TOKEN_B).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert 'model "openai/gpt-4" is not allowed' in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:
        malformed: list[Any] = [{"role": "user", "content": [{"type": "image_url", "image_url": "x", "deep": _deep(300)}]}]
        sdk(gw).chat.completions.create(model=MODEL, messages=malformed)
    assert "messages[0].content[0]" in str(caught.value)


def test_fireworks_chat_takes_the_same_fields(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    body = {
        "model": "accounts/fireworks/models/llama-v3p1-8b-instruct",
        "messages": [{"role": "user", "content": [{"type": "text", "text": mark}]}],
        "tools": TOOLS,
        "response_format": {"type": "json_object"},
    }
    response = post(gw, "/v1/completions/fireworks", body, headers={"X-Fireworks-Genie": "true"})
    assert response.status_code == 200, response.text
    sent = received(fake_provider.base_url, mark)[-1]
    assert sent["body"]["tools"] == TOOLS and sent["body"]["response_format"] == {"type": "json_object"}
    assert sent["headers"]["x-fireworks-genie"] == "true"


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value
