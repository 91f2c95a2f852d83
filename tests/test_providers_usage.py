"""Usage counting from each provider's wire format (reference 4.10, test vectors of 10.11).

Recorded provider responses (tests/fixtures/sse) go through each provider's
own call object, split at every kind of boundary, and must give the
provider's counts exactly once; what a provider does not report comes from
the offline tokenizer, and unknown stays None.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    # bpe_openai loads its vocabulary through a deprecated importlib API.
    warnings.simplefilter("ignore", DeprecationWarning)
    from upstreams.tokenizer import count_tokens, warm_up

    warm_up()

from conf.loader import load_config
from upstreams.anthropic_legacy import AnthropicLegacyProvider
from upstreams.base import ProviderCall, Usage
from upstreams.fireworks import FireworksProvider
from upstreams.google import GoogleProvider
from upstreams.openai_chat import OpenAIChatProvider

FIXTURES = Path(__file__).parent / "fixtures" / "sse"
CONFIG = load_config(None, environ={})


def fireworks() -> FireworksProvider:
    return FireworksProvider(CONFIG.providers.fireworks, max_messages=100)


def openai() -> OpenAIChatProvider:
    return OpenAIChatProvider(CONFIG.providers.openai, max_messages=100)


def google() -> GoogleProvider:
    return GoogleProvider(CONFIG.providers.google, max_messages=100)


def legacy() -> AnthropicLegacyProvider:
    return AnthropicLegacyProvider(CONFIG.providers.anthropic)


def parse(provider: Any, body: dict[str, Any], feature: str = "chat_completions") -> ProviderCall:
    return provider.parse(json.dumps(body).encode(), feature=feature, identifier="actor:uid", headers={})


def splits(data: bytes, seed: int) -> list[bytes]:
    """``data`` cut at random places (seed 0: one byte at a time; 1: whole)."""
    if seed == 0:
        return [data[i : i + 1] for i in range(len(data))]
    if seed == 1:
        return [data]
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 64)
        out.append(data[i : i + n])
        i += n
    return out


def run(call: ProviderCall, data: bytes, seed: int = 7) -> Usage:
    for chunk in splits(data, seed):
        call.feed(chunk)
    call.finish()
    call.finish()  # idempotent: counted once whatever the pipeline does
    return call.usage()


def texts_of(stream: str, pick: Any) -> str:
    out = []
    for block in stream.replace("\r\n", "\n").split("\n\n"):
        if block.startswith("data: {"):
            out.append(pick(json.loads(block[6:])))
    return "".join(out)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fireworks_stream_79_30(seed: int) -> None:
    raw = (FIXTURES / "fireworks_completions_stream.sse").read_bytes()
    call = parse(fireworks(), {"model": "starcoder", "prompt": "def fib", "stream": True}, "code_completions")
    usage = run(call, raw, seed)
    text = texts_of(raw.decode(), lambda e: e["choices"][0]["text"])
    assert (usage.prompt_tokens, usage.completion_tokens) == (79, 30)
    assert usage.completion_chars == len(text) and usage.prompt_chars == len("def fib")
    assert usage.completion_tokenizer_tokens is None and usage.prompt_tokenizer_tokens is None


def test_fireworks_non_stream_79_30() -> None:
    raw = (FIXTURES / "fireworks_completions.json").read_bytes()
    usage = run(parse(fireworks(), {"model": "starcoder", "prompt": "x"}, "code_completions"), raw)
    assert (usage.prompt_tokens, usage.completion_tokens) == (79, 30)
    assert usage.completion_chars == len(json.loads(raw)["choices"][0]["text"])


def test_fireworks_chat_stream_counts_delta_content() -> None:
    raw = (FIXTURES / "fireworks_chat_stream.sse").read_bytes()
    call = parse(fireworks(), {"model": "accounts/fireworks/models/mixtral-8x7b-instruct", "stream": True,
                               "messages": [{"role": "user", "content": "say it"}]})
    usage = run(call, raw)
    assert (usage.prompt_tokens, usage.completion_tokens) == (31, 6)
    assert usage.completion_chars == len("Sure, here it is.")
    assert usage.prompt_chars == len("say it")


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_openai_stream_427_12(seed: int) -> None:
    raw = (FIXTURES / "openai_chat_stream.sse").read_bytes()
    call = parse(openai(), {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": "capital of France?"}]})
    usage = run(call, raw, seed)
    assert (usage.prompt_tokens, usage.completion_tokens) == (427, 12)
    assert usage.completion_chars == len("The capital of France is Paris.")
    assert usage.prompt_chars == len("capital of France?")


def test_openai_non_stream_12_9_counts_message_content() -> None:
    raw = (FIXTURES / "openai_chat.json").read_bytes()
    usage = run(parse(openai(), {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}), raw)
    assert (usage.prompt_tokens, usage.completion_tokens) == (12, 9)
    # The reference read choices[0].content (absent) and counted 0.
    assert usage.completion_chars == len("Hello there, how may I assist you today?")


def test_openai_stream_without_usage_chunk_uses_the_tokenizer() -> None:
    raw = (FIXTURES / "openai_chat_stream.sse").read_text()
    without_usage = raw.replace(raw[raw.index('data: {"id":"chatcmpl-9xQpL2mZ","object":"chat.completion.chunk","created":1717171717,"model":"gpt-4o-2024-05-13","system_fingerprint":"fp_5b3c1f0e2a","choices":[],'):raw.index("data: [DONE]")], "")
    prompt = "capital of France?"
    usage = run(parse(openai(), {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": prompt}]}), without_usage.encode())
    answer = "The capital of France is Paris."
    assert usage.completion_tokens == usage.completion_tokenizer_tokens == count_tokens(answer)
    assert usage.prompt_tokens == usage.prompt_tokenizer_tokens == count_tokens(prompt + "\n")


@pytest.mark.parametrize("seed", [0, 1, 9])
def test_google_stream_21_87(seed: int) -> None:
    raw = (FIXTURES / "google_stream.sse").read_bytes()
    call = parse(google(), {"model": "gemini-1.5-flash", "stream": True, "contents": [{"role": "user", "parts": [{"text": "a poem"}]}]})
    usage = run(call, raw, seed)
    assert (usage.prompt_tokens, usage.completion_tokens) == (21, 87)
    text = texts_of(raw.decode(), lambda e: e["candidates"][0]["content"]["parts"][0]["text"])
    assert usage.completion_chars == len(text)
    assert usage.prompt_chars == len("a poem\n")


def test_google_non_stream_21_87() -> None:
    raw = (FIXTURES / "google.json").read_bytes()
    usage = run(parse(google(), {"model": "gemini-1.5-flash", "contents": [{"parts": [{"text": "a poem"}]}]}), raw)
    assert (usage.prompt_tokens, usage.completion_tokens) == (21, 87)
    assert usage.completion_chars == len(json.loads(raw)["candidates"][0]["content"]["parts"][0]["text"])


@pytest.mark.parametrize("fixture", ["anthropic_complete_2023-01-01.sse", "anthropic_complete_2023-06-01.sse"])
@pytest.mark.parametrize("seed", [0, 1, 4])
def test_anthropic_legacy_stream_both_shapes(fixture: str, seed: int) -> None:
    raw = (FIXTURES / fixture).read_bytes()
    prompt = "\n\nHuman: hi\n\nAssistant:"
    usage = run(parse(legacy(), {"model": "claude-instant-1.2", "prompt": prompt, "max_tokens_to_sample": 30, "stream": True}), raw, seed)
    answer = " Hello! How can I help?"
    assert usage.completion_chars == len(answer)
    assert usage.completion_tokens == usage.completion_tokenizer_tokens == count_tokens(answer)
    assert usage.prompt_tokens == usage.prompt_tokenizer_tokens == count_tokens(prompt)
    assert usage.prompt_chars == len(prompt)


def test_anthropic_legacy_non_stream() -> None:
    raw = (FIXTURES / "anthropic_complete.json").read_bytes()
    usage = run(parse(legacy(), {"model": "claude-2", "prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": 5}), raw)
    assert usage.completion_chars == len(" Hello! How can I help?")
    assert usage.completion_tokens == count_tokens(" Hello! How can I help?")


def test_a_stream_cut_short_counts_what_was_relayed() -> None:
    raw = (FIXTURES / "fireworks_completions_stream.sse").read_bytes()
    cut = raw[: raw.index(b"data:", raw.index(b"data:", raw.index(b"data:") + 1) + 1) + 20]
    call = parse(fireworks(), {"model": "starcoder", "prompt": "def fib", "stream": True}, "code_completions")
    usage = run(call, cut)
    assert usage.completion_chars == len("def fibonacci")
    assert usage.completion_tokens == count_tokens("def fibonacci")
    assert usage.prompt_tokens == count_tokens("def fib")


def test_garbage_and_errors_never_raise_and_stay_unknown() -> None:
    call = parse(google(), {"model": "gemini-pro", "stream": True, "contents": [{"parts": [{"text": "x"}]}]})
    run(call, b"data: {not json\r\n\r\ndata: [1,2]\r\n\r\n: keep-alive\r\n\r\n" + b'data: {"error":{"code":500,"message":"boom","status":"INTERNAL"}}\r\n\r\n')
    assert call.in_band_error == "boom"
    assert call.usage().completion_chars is None and call.usage().completion_tokens is None
    body = parse(openai(), {"model": "gpt-4", "messages": []})
    run(body, b"<html>not json</html>")
    assert body.usage().completion_tokens is None


@pytest.mark.parametrize(
    ("provider", "body"),
    [
        (legacy, {"model": "claude-2", "prompt": "x", "max_tokens_to_sample": -7}),
        (openai, {"model": "gpt-4", "max_tokens": 0, "messages": []}),
        (openai, {"model": "gpt-4", "max_completion_tokens": -1, "messages": []}),
        (openai, {"model": "gpt-4", "n": 0, "messages": []}),
        (fireworks, {"model": "starcoder", "max_tokens": -7, "prompt": "x"}),
        (google, {"model": "gemini-pro", "generationConfig": {"maxOutputTokens": -7}}),
        (google, {"model": "gemini-pro", "generationConfig": {"candidateCount": 0}}),
    ],
)
def test_counts_below_one_are_a_400(provider: Any, body: dict[str, Any]) -> None:
    # A negative max tokens would become a negative token reservation in the limiter.
    from errors import BadRequest

    with pytest.raises(BadRequest, match="must be at least 1"):
        parse(provider(), body)
