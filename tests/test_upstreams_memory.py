"""Memory held per open stream by the upstream side (issue 6: thousands of streams per process).

tracemalloc measures what the objects a stream keeps alive hold, so these
checks are deterministic: no RSS, no timing.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from conf.loader import load_config
from upstreams.anthropic_messages import AnthropicMessagesProvider
from upstreams.base import ProviderCall, json_body

pytestmark = pytest.mark.timeout(60)

CONFIG = load_config(None, environ={})


def traced_bytes(build: Callable[[], Any]) -> tuple[Any, int]:
    """What ``build()``'s result holds, measured with tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        return kept, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_a_request_body_holds_its_own_size_not_the_encoders_buffer() -> None:
    value = {"model": "claude-3-haiku", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    assert json_body(value) == orjson.dumps(value)
    bodies, held = traced_bytes(lambda: [json_body(value) for _ in range(500)])
    per_body = held / len(bodies)
    assert per_body < 4 * len(bodies[0]) + 64, per_body


def anthropic_call() -> ProviderCall:
    provider = AnthropicMessagesProvider(CONFIG.providers.anthropic, max_messages=100)
    body = {"model": "claude-3-haiku", "max_tokens": 4000, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    return provider.parse(orjson.dumps(body), feature="chat_completions", identifier="actor:uid", headers={})


def delta(text: str) -> bytes:
    payload = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
    return b"event: content_block_delta\ndata: " + orjson.dumps(payload) + b"\n\n"


START_WITH_USAGE = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","type":"message","role":"assistant",'
    b'"content":[],"model":"claude-3-haiku","usage":{"input_tokens":11,"output_tokens":1}}}\n\n'
)
START_WITHOUT_USAGE = b'event: message_start\ndata: {"type":"message_start","message":{"id":"m"}}\n\n'
WORDS = [f" word{i}" for i in range(2000)]


@pytest.mark.parametrize("reported", [True, False])
def test_completion_text_is_kept_only_while_the_tokenizer_may_need_it(reported: bool) -> None:
    from upstreams.tokenizer import warm_up

    warm_up()  # the vocabulary is loaded once at start, not per stream
    call = anthropic_call()
    call.feed(START_WITH_USAGE if reported else START_WITHOUT_USAGE)

    def stream() -> None:
        for word in WORDS:
            call.feed(delta(word))

    _, held = traced_bytes(stream)
    call.feed(b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":2000}}\n\n')
    call.finish()
    usage = call.usage()
    # Exact counts either way: characters from every delta, tokens as reported.
    assert usage.completion_chars == sum(len(w) for w in WORDS)
    assert usage.completion_tokens == 2000
    # Issue 17 item 6: message_start's output_tokens is a placeholder, so the text is
    # counted as it comes (the fallback if message_delta never arrives), in pieces:
    # either way no per-delta text is held for the stream's life.
    assert held < 8 * 1024, held


def test_without_any_reported_usage_the_tokenizer_counts_the_whole_text() -> None:
    from upstreams.tokenizer import count_tokens

    call = anthropic_call()
    call.feed(START_WITHOUT_USAGE)
    for word in WORDS[:50]:
        call.feed(delta(word))
    call.finish()
    usage = call.usage()
    assert usage.completion_tokens == usage.completion_tokenizer_tokens == count_tokens("".join(WORDS[:50]))
