"""Property tests for each provider's request decoding and response watching.

For every completion route the registry builds, any client body either
becomes a provider call whose upstream body is valid JSON, or is a 4xx
GatewayError; no other exception (which would be a 500). A call then
survives any bytes as an upstream response and reports usage as
non-negative ints or None.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conf.loader import load_config
from errors import GatewayError
from tests.test_fuzz_support import counted, examples, fuzz_summary  # noqa: F401  (fixture)
from upstreams.base import Provider
from upstreams.decode import opt_int, opt_number
from upstreams.registry import build_providers

ENV = {
    "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": "k-anthropic",
    "CODY_GATEWAY_OPENAI_ACCESS_TOKEN": "k-openai",
    "CODY_GATEWAY_FIREWORKS_ACCESS_TOKEN": "k-fireworks",
    "CODY_GATEWAY_GOOGLE_ACCESS_TOKEN": "k-google",
    "CODY_GATEWAY_SERVER_MAX_MESSAGES": "8",
}


def providers() -> list[tuple[str, Provider]]:
    return list(build_providers(load_config(None, environ=ENV)).items())


PROVIDERS = providers()

NUMBER = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 4000, 4001, 1e300, -1e300, 2.5, 1e19, 2**53 + 1]),
)
EDGE: st.SearchStrategy[Any] = st.sampled_from([1e300, -1e300, 1e19, 2**63 - 1, -(2**63), 0, -1, 4001, 1.5, "", [], {}, None, True, [None], [{}], [{"type": "image"}], "x" * 5000])
TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["user", "assistant", "system", "model", "human", "text", "image", "claude-3-haiku-20240307", "gpt-4o", "gemini-1.5-flash", "starcoder", "anthropic/claude-3-haiku-20240307"]))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
NAMES = st.sampled_from(["role", "content", "text", "type", "parts", "speaker", "name", "temperature", "maxOutputTokens", "topK", "category", "threshold", "include_usage"])
JSON = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(NAMES, st.text(max_size=6)), inner, max_size=4)),
    max_leaves=12,
)


def valid_bodies(provider: Provider) -> list[bytes]:
    out = []
    for body in (
        {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}], "max_tokens": 5, "stream": True},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        {"model": "m", "prompt": "\n\nHuman: hi\n\nAssistant:", "max_tokens_to_sample": 5, "stream": True},
        {"model": "m", "contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 5}},
        {"model": "m", "prompt": "def f():", "max_tokens": 5, "stream": True},
    ):
        raw = orjson.dumps(body)
        try:
            provider.parse(raw, feature="chat_completions", identifier="a:b", headers={})
        except GatewayError:
            continue
        out.append(raw)
    assert out, f"no valid body for {type(provider).__name__}"
    return out


def request_fields(provider: Provider) -> tuple[str, ...]:
    module = sys.modules[type(provider).__module__]
    return tuple(getattr(module, "REQUEST_FIELDS", ("model", "messages", "stream", "max_tokens")))


@st.composite
def bodies(draw: st.DrawFn, provider: Provider) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=60))
    if kind == 1:
        return orjson.dumps(draw(JSON))
    fields = request_fields(provider)
    # Start from a body the provider accepts, so that every field's own checks are reached.
    doc = dict(orjson.loads(draw(st.sampled_from(VALID[id(provider)]))))
    for name in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True)):
        doc[name] = draw(st.one_of(JSON, EDGE))
    for name in ("messages", "contents"):
        if isinstance(doc.get(name), list) and doc[name] and draw(st.booleans()):
            # Mutate inside the first message too.
            message = doc[name][0]
            if isinstance(message, dict):
                message = dict(message)
                message[draw(NAMES)] = draw(st.one_of(JSON, EDGE))
                doc[name] = [message, *doc[name][1:]]
    if draw(st.booleans()):
        # Case variants: the decoder matches keys case-insensitively, as Go does.
        doc = {(k.upper() if draw(st.booleans()) else k): v for k, v in doc.items()}
    return orjson.dumps(doc)


VALID = {id(provider): valid_bodies(provider) for _, provider in PROVIDERS}


def check_usage(call: Any) -> None:
    for value in call.usage().event_fields().values():
        assert value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0), value


@pytest.mark.parametrize(("path", "provider"), PROVIDERS, ids=[p for p, _ in PROVIDERS])
def test_request_decoding_never_raises_anything_but_a_4xx(path: str, provider: Provider) -> None:
    @settings(max_examples=examples(250), deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=bodies(provider), feature=st.sampled_from(["chat_completions", "code_completions"]), response=st.binary(max_size=200))
    @counted(f"decode: {path}")
    def run(body: bytes, feature: str, response: bytes) -> None:
        try:
            call = provider.parse(body, feature=feature, identifier="actor:uid", headers={})
        except GatewayError as exc:
            assert 400 <= exc.status < 500, exc
            assert exc.message
            return
        upstream = call.upstream_request()
        assert isinstance(orjson.loads(upstream.body), dict)
        assert isinstance(call.info.model, str)
        # The sign of max_tokens is checked by test_negative_max_tokens_is_a_400.
        assert call.info.max_tokens is None or isinstance(call.info.max_tokens, int)
        # Whatever the upstream answers, watching it never raises.
        call.feed(response)
        call.feed(response[::-1])
        call.finish()
        check_usage(call)
        assert orjson.loads(call.stream_error_event("boom").split(b"data: ", 1)[1]) is not None

    run()




def _usage_params() -> list[Any]:
    out = []
    for path, provider in PROVIDERS:
        marks: list[Any] = []
        out.append(pytest.param(path, provider, id=path, marks=marks))
    return out


@pytest.mark.parametrize(("path", "provider"), _usage_params())
def test_hostile_usage_numbers_are_not_trusted(path: str, provider: Provider) -> None:
    """Usage fields from the upstream that are not non-negative ints are unknown, not counted."""

    @settings(max_examples=examples(60), deadline=None)
    @example(value="abc")
    @example(value=-5)
    @example(value=[1])
    @example(value=1e308)
    @given(value=st.one_of(JSON, st.sampled_from([-1, -(2**63), 2**64, 1e308, "12", True, None, [], {}])))
    @counted(f"decode usage: {path}")
    def run(value: Any) -> None:
        good = VALID[id(provider)][0]
        call = provider.parse(good, feature="chat_completions", identifier="a:b", headers={})
        usage = {"input_tokens": value, "output_tokens": value, "prompt_tokens": value, "completion_tokens": value,
                 "promptTokenCount": value, "candidatesTokenCount": value, "cache_read_input_tokens": value}
        payloads = [
            {"type": "message", "usage": usage, "content": [{"type": "text", "text": "x"}]},
            {"choices": [{"message": {"content": "x"}}], "usage": usage},
            {"candidates": [{"content": {"parts": [{"text": "x"}]}}], "usageMetadata": usage},
            {"completion": "x", "usage": usage},
        ]
        for payload in payloads:
            data = json.dumps(payload).encode()
            call.feed(data)
            call.feed(b"event: message_start\ndata: " + json.dumps({"message": {"usage": usage}}).encode() + b"\n\n")
            call.feed(b"event: message_delta\ndata: " + json.dumps({"usage": usage}).encode() + b"\n\n")
            call.feed(b"data: " + data + b"\n\n")
        call.finish()
        check_usage(call)

    run()


@settings(max_examples=examples(200), deadline=None)
@given(value=st.one_of(JSON, EDGE))
@counted("decode: typed field helpers")
def test_typed_helpers_return_forwardable_values(value: Any) -> None:
    """What opt_int/opt_number accept must be re-encodable for the upstream body."""
    for helper in (opt_int, opt_number):
        try:
            out = helper({"k": value}, "k")
        except GatewayError as exc:
            assert exc.status == 400
            continue
        orjson.dumps({"k": out})


NEGATIVE_MAX_TOKENS = {
    "anthropic-messages": {"model": "m", "max_tokens": -7, "messages": [{"role": "user", "content": "hi"}]},
    "anthropic": {"model": "m", "max_tokens_to_sample": -7, "prompt": "\n\nHuman: hi\n\nAssistant:"},
    "openai": {"model": "m", "max_tokens": -7, "messages": [{"role": "user", "content": "hi"}]},
    "fireworks": {"model": "m", "max_tokens": -7, "prompt": "def f():"},
    "google": {"model": "m", "contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": -7}},
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name)
        for name in NEGATIVE_MAX_TOKENS
    ],
)
def test_negative_max_tokens_is_a_400(name: str) -> None:
    provider = dict(PROVIDERS)[name]
    with pytest.raises(GatewayError) as info:
        provider.parse(orjson.dumps(NEGATIVE_MAX_TOKENS[name]), feature="chat_completions", identifier="a:b", headers={})
    assert info.value.status == 400
