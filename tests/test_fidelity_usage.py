"""Usage numbers (issue 17 items 6, 7, 8; issue 15 usage components): provisional counts
never win over what was relayed, upstream numbers are bounded, any size is counted."""

# The fixtures imported from tests.providers_support are parameters of the tests.

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.providers_support import (  # noqa: F401  (fixtures)
    WiredGateway,
    gw,
    marker,
    post,
    received,
    start_module_wired,
)
from upstreams.anthropic_messages import AnthropicMessagesCall
from upstreams.base import CallInfo, UpstreamRequest
from upstreams.buffered_call import MAX_USAGE_TOKENS, usage_count
from upstreams.google import GoogleCall
from upstreams.openai_chat import OpenAIChatCall
from upstreams.tokenizer import count_tokens

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def shared(start_module_wired: Any) -> WiredGateway:
    return start_module_wired()


def _call(cls: type, stream: bool = True) -> Any:
    return cls(UpstreamRequest("u", {}, b"{}"), CallInfo(model="m", stream=stream), None, prompt_chars=1, prompt_text="hi")


def _sse(name: str | None, data: Any) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


# -- item 6: provisional counts ---------------------------------------------------------------


def test_anthropic_placeholder_output_tokens_never_wins() -> None:
    call = _call(AnthropicMessagesCall)
    call.feed(_sse("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}}))
    text = "word " * 400
    for piece in text.split(" ")[:-1]:
        call.feed(_sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece + " "}}))
    call.finish()  # cut before message_delta
    usage = call.usage()
    assert usage.prompt_tokens == 10
    assert usage.completion_tokens == usage.completion_tokenizer_tokens == count_tokens(text) >= 400


def test_anthropic_final_count_wins_when_it_came() -> None:
    call = _call(AnthropicMessagesCall)
    call.feed(_sse("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}}))
    call.feed(_sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}))
    call.feed(_sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 17}}))
    call.finish()
    assert call.usage().completion_tokens == 17 and call.usage().completion_tokenizer_tokens is None


def test_anthropic_stream_cut_before_message_delta_through_the_gateway(gw: WiredGateway) -> None:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 1000, "stream": True,
            "messages": [{"role": "user", "content": "x fake:tokens=400 fake:disconnect_after=400"}]}
    response = post(gw, "/v1/completions/anthropic-messages", body)
    assert response.status_code == 200
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    # 400 deltas of one word each reached the client: not billed as the placeholder's 1.
    assert meta["completion_token_count"] >= 400
    assert meta["outcome"] in ("upstream_error", "complete")


def test_openai_running_usage_is_provisional() -> None:
    call = _call(OpenAIChatCall)
    text = "alpha beta gamma delta " * 50
    call.feed(b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                                          "usage": {"prompt_tokens": 5, "completion_tokens": 2}}) + b"\n\n")
    call.finish()  # no final usage chunk
    assert call.usage().prompt_tokens == 5
    assert call.usage().completion_tokens == count_tokens(text) > 2


def test_openai_final_usage_chunk_wins() -> None:
    call = _call(OpenAIChatCall)
    call.feed(b'data: {"choices":[{"index":0,"delta":{"content":"hi there"},"finish_reason":null}]}\n\n')
    call.feed(b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":40,'
              b'"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":38}}}\n\n')
    call.finish()
    usage = call.usage()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cache_read_tokens, usage.reasoning_tokens) == (5, 40, 3, 38)
    assert usage.event_fields()["completion_reasoning_token_count"] == 38
    assert usage.event_fields()["prompt_cache_creation_token_count"] is None


def test_openai_stream_without_final_usage_through_the_gateway(gw: WiredGateway) -> None:
    body = {"model": "gpt-4", "stream": True, "messages": [{"role": "user", "content": "x fake:tokens=50 fake:disconnect_after=50"}]}
    response = post(gw, "/v1/completions/openai", body)
    assert response.status_code == 200
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert meta["completion_token_count"] == meta["completion_tokenizer_token_count"] >= 50


def test_gemini_running_usage_is_provisional() -> None:
    call = _call(GoogleCall)
    text = "one two three four five six seven eight nine ten " * 10
    call.feed(b"data: " + orjson.dumps({"candidates": [{"content": {"parts": [{"text": text}]}}],
                                          "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 3}}) + b"\r\n\r\n")
    call.finish()
    assert call.usage().completion_tokens == count_tokens(text) > 3
    final = _call(GoogleCall)
    final.feed(b"data: " + orjson.dumps({"candidates": [{"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP"}],
                                           "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 3, "thoughtsTokenCount": 5,
                                                             "cachedContentTokenCount": 2}}) + b"\r\n\r\n")
    final.finish()
    usage = final.usage()
    assert (usage.completion_tokens, usage.reasoning_tokens, usage.cache_read_tokens) == (8, 5, 2)


# -- item 7: bounded numbers ------------------------------------------------------------------


@pytest.mark.parametrize("value", [2**63 - 1, 2**64, MAX_USAGE_TOKENS + 1, -1, 1.5, True, "12", None])
def test_out_of_range_usage_is_not_a_count(value: Any) -> None:
    assert usage_count(value) is None


def test_in_range_usage_is_a_count() -> None:
    assert usage_count(0) == 0 and usage_count(MAX_USAGE_TOKENS) == MAX_USAGE_TOKENS


def test_a_huge_upstream_usage_never_reaches_the_event(gw: WiredGateway) -> None:
    for path, body in (
        ("/v1/completions/anthropic-messages", {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": [{"role": "user", "content": "hi fake:input_tokens=9223372036854775807 fake:cache_read=9223372036854775807"}]}),
        ("/v1/completions/openai", {"model": "gpt-4", "stream": True, "messages": [{"role": "user", "content": "hi fake:input_tokens=9223372036854775807"}]}),
    ):
        response = post(gw, path, body)
        assert response.status_code == 200, response.text
        meta = gw.event_for(response.headers["X-Trace"])["metadata"]
        assert meta["outcome"] == "complete"
        assert 0 < meta["prompt_token_count"] < 1000  # the tokenizer's count, not 2**63
        assert meta["prompt_cache_read_token_count"] is None


# -- item 8: any size is counted --------------------------------------------------------------


def test_tokenizer_counts_any_size() -> None:
    assert count_tokens("x" * 1_100_000) > 0
    assert count_tokens("word " * 1_000_000) >= 900_000
    assert count_tokens("hello world") == 2


def test_a_million_character_prompt_is_not_a_500(gw: WiredGateway) -> None:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "word " * 200_000}]}
    response = post(gw, "/v1/completions/anthropic-messages", body, timeout=60)
    assert response.status_code == 200, response.text[:500]


def test_a_huge_completion_without_usage_is_counted(gw: WiredGateway) -> None:
    body = {"model": "gpt-4", "stream": True, "messages": [{"role": "user", "content": "x fake:huge_event_bytes=1100000 fake:no_usage=1 fake:tokens=3"}]}
    response = post(gw, "/v1/completions/openai", body, timeout=60)
    assert response.status_code == 200
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert meta["outcome"] == "complete"
    assert meta["completion_character_count"] > 1_100_000
    assert meta["completion_token_count"] and meta["completion_token_count"] > 1000


# -- issue 17 item 21: Fireworks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "accounts/sourcegraph/models/lang-typescript-context-fim-meta-llama-3-8b-instruct-e-1",
        "accounts/sourcegraph/models/lang-javascript-context-fim-meta-llama-3-8b-instruct-e-1",
        "accounts/sourcegraph/models/lang-php-context-fim-meta-llama-3-8b-instruct-e-1",
        "accounts/sourcegraph/models/lang-python-context-fim-meta-llama-3-8b-instruct-e-1",
        "accounts/sourcegraph/models/finetuned-fim-lang-all-model-meta-llama-3-8b",
    ],
)
def test_reference_llama_fine_tuned_models_are_allowed_by_default(gw: WiredGateway, fake_provider: Any, model: str) -> None:
    mark = marker()
    response = post(gw, "/v1/completions/fireworks", {"model": f"fireworks/{model}", "prompt": mark}, feature="code_completions",
                    headers={"X-Fireworks-Genie": "true"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Cody-Resolved-Model"] == f"fireworks/{model}"
    assert received(fake_provider.base_url, mark)[-1]["headers"]["x-fireworks-genie"] == "true"
