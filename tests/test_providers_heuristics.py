"""The pure parts: abuse heuristics (reference 10.9), circuit breaker (10.12, SPEC point 8),
Fireworks model picking (10.11) and the flagged-prompt stores (memory and a real Redis)."""

from __future__ import annotations

import asyncio
import dataclasses
import warnings
from typing import Any

import pytest

with warnings.catch_warnings():
    # bpe_openai loads its vocabulary through a deprecated importlib API.
    warnings.simplefilter("ignore", DeprecationWarning)
    from upstreams.tokenizer import count_tokens, warm_up

    warm_up()

from abuse import flagging
from abuse.prompt_store import MemoryPromptStore, RedisPromptStore, prompt_key, split_key
from conf.loader import load_config
from upstreams.base import FlagInput
from upstreams.circuit import CircuitBreaker
from upstreams.fireworks import pick_fine_tuned, pick_starcoder

CONFIG = load_config(None, environ={})
PREAMBLE = "You are Cody-Gateway."
FLAGGING = dataclasses.replace(
    CONFIG.flagging,
    prompt_token_flagging_limit=18000,
    prompt_token_blocking_limit=20000,
    max_tokens_to_sample_flagging_limit=4000,
    response_token_blocking_limit=4000,
    request_blocking_enabled=True,
    flagged_model_names=("dangerous-llm-model",),
    allowed_prompt_patterns=(PREAMBLE.lower(),),
    blocked_prompt_patterns=(),
)


def flag(prompt: str, *, model: str = "claude-2", max_tokens: int = 200) -> FlagInput:
    return FlagInput(model=model, prompt=prompt, max_tokens=max_tokens, uses_tokenizer=True)


def check(prompt: str, config: Any = FLAGGING, tokens: int | None = -2, **kwargs: Any) -> flagging.FlaggingResult | None:
    count = count_tokens(prompt) if tokens == -2 else tokens
    return flagging.check(flag(prompt, **kwargs), count, config)


class TestFlagging:
    def test_preamble_missing_is_flagged_not_blocked(self) -> None:
        result = check("no preamble here")
        assert result is not None and result.reasons == ("unknown_prompt",) and not result.should_block

    def test_no_allowed_patterns_is_not_flagged(self) -> None:
        assert check("no preamble here", dataclasses.replace(FLAGGING, allowed_prompt_patterns=())) is None

    def test_preamble_present_is_not_flagged(self) -> None:
        assert check(f"{PREAMBLE} hello") is None

    def test_high_max_tokens_is_blocked_with_its_own_reason(self) -> None:
        result = check(f"{PREAMBLE} hi", max_tokens=4001)
        assert result is not None and result.should_block and result.max_tokens == 4001
        # The reference also said "blocked_phrase" here; no phrase matched.
        assert result.reasons == ("high_max_tokens_to_sample",) and result.blocked_phrase is None

    def test_blocked_phrase(self) -> None:
        config = dataclasses.replace(FLAGGING, blocked_prompt_patterns=("bad phrase",))
        result = check("no preamble, a BAD PHRASE", config)
        assert result is not None and result.should_block
        assert result.reasons == ("unknown_prompt", "blocked_phrase") and result.blocked_phrase == "bad phrase"
        assert result.event_metadata(dotcom=False)["flagging_result"]["blocked_phrase"] == "bad p"
        with_preamble = check(f"{PREAMBLE} bad phrase", config)
        assert with_preamble is not None and with_preamble.should_block and with_preamble.reasons == ("blocked_phrase",)

    def test_blocking_disabled_flags_only(self) -> None:
        config = dataclasses.replace(FLAGGING, blocked_prompt_patterns=("bad phrase",), request_blocking_enabled=False)
        result = check(f"{PREAMBLE} bad phrase", config)
        assert result is not None and not result.should_block

    def test_token_limits(self) -> None:
        prompt = PREAMBLE + " word" * 50
        limit = count_tokens(prompt)
        config = dataclasses.replace(FLAGGING, prompt_token_flagging_limit=limit, prompt_token_blocking_limit=limit + 10)
        assert check(prompt, config, tokens=None) is None  # no tokenizer: no token checks
        assert check(prompt[:-8], config) is None
        flagged = check(prompt + " qed", config)
        assert flagged is not None and flagged.reasons == ("high_prompt_token_count",) and not flagged.should_block
        assert flagged.prompt_token_count is not None and flagged.prompt_token_count > limit
        blocked = check(prompt + " qed" * 20, config)
        assert blocked is not None and blocked.should_block and blocked.reasons == ("high_prompt_token_count",)

    def test_reference_sized_prompts(self) -> None:
        flagged = check(PREAMBLE + " word" * 18001)
        assert flagged is not None and not flagged.should_block
        assert flagged.prompt_token_count == count_tokens(PREAMBLE) + 18001
        blocked = check(PREAMBLE + " word" * 20001)
        assert blocked is not None and blocked.should_block

    def test_model_names(self) -> None:
        config = dataclasses.replace(FLAGGING, allowed_prompt_patterns=())
        assert check("hi", config, model="") is None
        assert check("hi", dataclasses.replace(config, flagged_model_names=()), model="dangerous-llm-model") is None
        result = check("hi", config, model="Dangerous-LLM-Model")
        assert result is not None and result.reasons == ("model_used",)

    def test_invalid_config_raises(self) -> None:
        with pytest.raises(flagging.InvalidFlaggingConfig):
            check("x", dataclasses.replace(FLAGGING, response_token_blocking_limit=0))

    def test_event_metadata_and_prompt_prefix(self) -> None:
        prompt = "é" * 300
        result = check(prompt)
        assert result is not None
        assert result.event_metadata(dotcom=False) == {"flagged": True, "flagging_result": {"reason": ["unknown_prompt"], "should_block": False}}
        prefix = result.event_metadata(dotcom=True)["flagging_result"]["prompt_prefix"]
        assert prefix == "é" * 125 and len(prefix.encode()) == 250


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **overrides: Any) -> CircuitBreaker:
    upstream = dataclasses.replace(CONFIG.upstream, **overrides)
    return CircuitBreaker(upstream, clock=clock)


class TestCircuitBreaker:
    def test_defaults_are_the_reference_with_a_minimum_sample(self) -> None:
        upstream = CONFIG.upstream
        assert (upstream.circuit_window, upstream.circuit_window_s, upstream.circuit_failure_ratio, upstream.circuit_min_samples) == (100, 60, 0.95, 10)

    def test_one_lone_500_does_not_open(self) -> None:
        clock = Clock()
        cb = breaker(clock)
        cb.record("anthropic/claude-2", 500)
        assert cb.available("anthropic/claude-2")

    def test_opens_at_the_ratio_after_min_samples_and_recovers(self) -> None:
        clock = Clock()
        cb = breaker(clock)
        for code in (500, 504, 429, 0, 500, 500, 500, 500, 500):
            cb.record("m", code)
        assert cb.available("m")  # 9 < 10 samples
        cb.record("m", 500)
        assert not cb.available("m")
        assert cb.snapshot()["models"]["m"] == {"state": "open", "recent_attempts": 10, "recent_failures": 10, "failure_ratio": 1.0}
        assert cb.available("other")
        clock.now += 60.001
        assert cb.available("m")  # the failures aged out of the window

    def test_threshold_is_inclusive_and_only_failures_count(self) -> None:
        clock = Clock()
        closed = breaker(clock)
        for code in [500] * 18 + [200, 503]:  # 503 is not one of the failure codes
            closed.record("m", code)
        assert closed.available("m")  # 18/20 = 0.9
        at_threshold = breaker(clock)
        for code in [500] * 19 + [400]:
            at_threshold.record("m", code)
        assert not at_threshold.available("m")  # 19/20 = 0.95

    def test_reference_ratio_vectors_with_min_samples_1(self) -> None:
        clock = Clock()
        for codes, available in (
            ([200, 429, 200, 200], True),
            ([200, 429, 429, 200], False),
            ([200, 429, 429, 500], False),
            ([], True),
        ):
            cb = breaker(clock, circuit_failure_ratio=0.5, circuit_min_samples=1)
            for code in codes:
                cb.record("m", code)
            assert cb.available("m") is available, codes

    def test_window_is_a_ring_and_old_records_leave_it(self) -> None:
        clock = Clock()
        cb = breaker(clock, circuit_window=2, circuit_min_samples=1, circuit_failure_ratio=0.5)
        cb.record("m", 500)
        cb.record("m", 200)
        cb.record("m", 200)  # pushes the 500 out of the ring of 2
        assert cb.available("m") and cb._recent("m") == (2, 0)
        cb2 = breaker(clock, circuit_min_samples=1, circuit_failure_ratio=0.5)
        cb2.record("m", 500)
        clock.now += 30
        cb2.record("m", 200)
        cb2.record("m", 500)
        cb2.record("m", 500)
        clock.now += 30  # the first record is exactly 60 s old: still inside
        assert cb2._recent("m") == (4, 3)
        clock.now += 0.5
        assert cb2._recent("m") == (3, 2)

    def test_health_probe(self) -> None:
        clock = Clock()
        cb = breaker(clock, circuit_min_samples=1)
        cb.record("google/gemini-pro", 504)
        probe = asyncio.run(cb.health_probe())
        assert probe["ok"] is True and probe["open"] == ["google/gemini-pro"]
        assert probe["models"]["google/gemini-pro"]["state"] == "open"


class TestFireworksModels:
    def test_starcoder_split(self) -> None:
        fw = CONFIG.providers.fireworks
        all_st = dataclasses.replace(fw, starcoder_community_single_tenant_percent=100, starcoder_enterprise_single_tenant_percent=100)
        no_st = dataclasses.replace(fw, starcoder_community_single_tenant_percent=0, starcoder_enterprise_single_tenant_percent=0)
        for roll in (0, 50, 99):
            for model in ("starcoder", "starcoder-16b", "starcoder-7b"):
                assert pick_starcoder(model, all_st, roll) == "accounts/sourcegraph/models/starcoder-16b"
            assert pick_starcoder("starcoder", no_st, roll) == "accounts/fireworks/models/starcoder-16b"
            assert pick_starcoder("starcoder-16b", no_st, roll) == "accounts/fireworks/models/starcoder-16b"
            assert pick_starcoder("starcoder-7b", no_st, roll) == "accounts/fireworks/models/starcoder-7b"
            assert pick_starcoder("starcoder2-15b", no_st, roll) == "accounts/sourcegraph/models/starcoder2-15b"
            assert pick_starcoder("starcoder2-7b", no_st, roll) == "accounts/sourcegraph/models/starcoder2-7b"
        thirty = dataclasses.replace(fw, starcoder_enterprise_single_tenant_percent=30)
        picks = [pick_starcoder("starcoder", thirty, roll) for roll in range(100)]
        assert picks.count("accounts/sourcegraph/models/starcoder-16b") == 30

    def test_fine_tuned_by_language(self) -> None:
        sg = "accounts/sourcegraph/models/"
        stack = "fim-lang-specific-model-deepseek-stack-trained"
        logs = "fim-lang-specific-model-deepseek-logs-trained"
        mixtral = "fim-lang-specific-model-mixtral"
        assert pick_fine_tuned(stack, "typescriptreact") == sg + "finetuned-fim-lang-ts-like-model-deepseek-7b-stack-v2"
        assert pick_fine_tuned(stack, "python") == sg + "finetuned-fim-lang-py-model-deepseek-7b-stack-v2"
        assert pick_fine_tuned(stack, "go") == sg + "deepseek-coder-7b-base"
        assert pick_fine_tuned(logs, "javascript") == sg + "finetuned-fim-lang-js-model-deepseek-7b-logs-v2"
        assert pick_fine_tuned(logs, "javascriptreact") == sg + "finetuned-fim-lang-tsx-jsx-model-deepseek-7b-logs-v2"
        assert pick_fine_tuned(logs, "") == sg + "deepseek-coder-7b-base"
        assert pick_fine_tuned(mixtral, "php") == sg + "finetuned-fim-lang-php-model-mixtral-8x7b"
        assert pick_fine_tuned(mixtral, "rust") == sg + "finetuned-fim-lang-all-model-mixtral-8x7b"
        assert pick_fine_tuned("accounts/fireworks/models/starcoder-7b", "python") == "accounts/fireworks/models/starcoder-7b"


class TestPromptStores:
    def test_keys(self) -> None:
        key = prompt_key("trace-1", "chat_completions", "user:with:colons")
        assert key == "prompt:trace-1:chat_completions:user:with:colons"
        assert split_key(key) == {"key": key, "traceId": "trace-1", "feature": "chat_completions", "userId": "user:with:colons"}
        assert split_key("prompt:only:two") is None and split_key("other:a:b:c") is None

    def test_memory_store_ttl_and_bounds(self) -> None:
        clock = Clock()
        store = MemoryPromptStore(max_entries=3, max_bytes=100, clock=clock)

        async def scenario() -> None:
            await store.record("prompt:t1:f:a", "one", 10)
            await store.record("prompt:t2:f:a", "two", 20)
            assert await store.get("prompt:t1:f:a") == "one"
            clock.now += 10
            assert await store.get("prompt:t1:f:a") is None
            assert await store.keys() == ["prompt:t2:f:a"]
            for i in range(3, 7):
                await store.record(f"prompt:t{i}:f:a", "x", 60)
            assert len(await store.keys()) == 3  # oldest evicted
            await store.record("prompt:big:f:a", "y" * 90, 60)
            assert await store.keys() == ["prompt:big:f:a", "prompt:t5:f:a", "prompt:t6:f:a"]
            await store.record("prompt:z:f:a", "z" * 20, 60)  # over 100 bytes: oldest out until it fits
            assert await store.keys() == ["prompt:z:f:a"]

        asyncio.run(scenario())

    def test_redis_store(self, redis_server: Any) -> None:
        from redisconn.connect import connect

        async def scenario() -> None:
            client = connect(redis_server.url, timeout_ms=1000, max_connections=4)
            try:
                store = RedisPromptStore(client)
                await store.record("prompt:t1:chat_completions:u1", "héllo", 30)
                await client.set("unrelated", "x")
                assert await store.keys() == ["prompt:t1:chat_completions:u1"]
                assert await store.get("prompt:t1:chat_completions:u1") == "héllo"
                assert 0 < await client.ttl("prompt:t1:chat_completions:u1") <= 30
                assert await store.get("prompt:nope") is None
            finally:
                await client.aclose()

        asyncio.run(scenario())
