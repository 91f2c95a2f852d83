"""Fireworks: POST /v1/completions/fireworks -> {api_url}/inference/v1/chat/completions
(feature chat_completions) or {api_url}/inference/v1/completions (everything else).

Reference section 4.5: ``n`` is capped at 1, ``languageId`` is read and
removed, virtual model names are resolved (the StarCoder single-tenant
split, the language-specific fine-tuned models) and the allowlist applies to
the resolved model. Deliberate fixes:
- zero values the client sent are forwarded, not dropped;
- characters are counted for chat responses too (``delta.content`` /
  ``message.content``; the reference only read ``text``), and the prompt's
  characters include chat messages;
- the abuse heuristics run for Fireworks like for every other provider
  (the reference never flagged Fireworks requests);
- an allowed virtual name admits every model it can resolve to (the
  reference did so for ``starcoder`` only);
- on the chat endpoint the OpenAI-compatible fields Fireworks takes
  (``CHAT_PASSTHROUGH_FIELDS``: tools, response_format, reasoning_effort, ...)
  are forwarded, and messages may carry content parts, ``tool_calls`` and
  ``tool_call_id``; a text-only request is forwarded exactly as before;
- ``X-Fireworks-Genie: true`` is forwarded and marks the call ``traced``
  (counted in ``cody_gateway_fireworks_traced_requests_total``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from actors.model import CHAT_COMPLETIONS
from conf.model import FireworksConfig
from errors import BadRequest
from upstreams.base import IDENTITY_ENCODING, CallInfo, FlagInput, UpstreamRequest, json_body
from upstreams.buffered_call import at_least_one
from upstreams.decode import (
    dropped_fields,
    known_fields,
    opt_bool,
    opt_int,
    opt_list,
    opt_number,
    opt_str,
    opt_str_list,
    parse_body,
    passthrough,
    require_object,
)
from upstreams.openai_wire import OpenAIStyleCall, message_content, message_extras

PROVIDER = "fireworks"
CORE_FIELDS = (
    "prompt", "messages", "model", "max_tokens", "temperature", "top_p", "n", "stream",
    "echo", "stop", "languageId",
)
# OpenAI-compatible fields of Fireworks' chat endpoint, forwarded as sent (chat
# feature only), as documented on 2026-12-01 (docs.fireworks.ai, chat completions).
CHAT_PASSTHROUGH_FIELDS: dict[str, type] = {
    "tools": list,
    "tool_choice": object,
    "parallel_tool_calls": bool,
    "response_format": dict,
    "reasoning_effort": object,
    "seed": int,
    "logprobs": object,
    "top_logprobs": int,
    "prediction": dict,
    "presence_penalty": object,
    "frequency_penalty": object,
    "top_k": int,
}
REQUEST_FIELDS = CORE_FIELDS + tuple(CHAT_PASSTHROUGH_FIELDS)

# Model ids (facts of the Fireworks deployment the reference routes to).
STARCODER_16B_SINGLE_TENANT = "accounts/sourcegraph/models/starcoder-16b"
STARCODER_16B = "accounts/fireworks/models/starcoder-16b"
STARCODER_7B = "accounts/fireworks/models/starcoder-7b"
STARCODER_16B_8BIT = "accounts/fireworks/models/starcoder-16b-w8a16"
STARCODER_7B_8BIT = "accounts/fireworks/models/starcoder-7b-w8a16"
STARCODER2_15B = "accounts/sourcegraph/models/starcoder2-15b"
STARCODER2_7B = "accounts/sourcegraph/models/starcoder2-7b"
DEEPSEEK_CODER_7B = "accounts/sourcegraph/models/deepseek-coder-7b-base"

_SG = "accounts/sourcegraph/models/"
# The reference's Llama-3-8B fine-tuned models (allowed by default; not virtual).
FINE_TUNED_LLAMA = (
    _SG + "lang-typescript-context-fim-meta-llama-3-8b-instruct-e-1",
    _SG + "lang-javascript-context-fim-meta-llama-3-8b-instruct-e-1",
    _SG + "lang-php-context-fim-meta-llama-3-8b-instruct-e-1",
    _SG + "lang-python-context-fim-meta-llama-3-8b-instruct-e-1",
    _SG + "finetuned-fim-lang-all-model-meta-llama-3-8b",
)
# Virtual fine-tuned model -> (languageId -> concrete model, fallback).
FINE_TUNED: dict[str, tuple[dict[str, str], str]] = {
    "fim-lang-specific-model-deepseek-stack-trained": (
        {
            "typescript": _SG + "finetuned-fim-lang-ts-like-model-deepseek-7b-stack-v2",
            "typescriptreact": _SG + "finetuned-fim-lang-ts-like-model-deepseek-7b-stack-v2",
            "javascript": _SG + "finetuned-fim-lang-ts-like-model-deepseek-7b-stack-v2",
            "javascriptreact": _SG + "finetuned-fim-lang-ts-like-model-deepseek-7b-stack-v2",
            "python": _SG + "finetuned-fim-lang-py-model-deepseek-7b-stack-v2",
        },
        DEEPSEEK_CODER_7B,
    ),
    "fim-lang-specific-model-deepseek-logs-trained": (
        {
            "typescript": _SG + "finetuned-fim-lang-ts-model-deepseek-7b-logs-v2",
            "javascript": _SG + "finetuned-fim-lang-js-model-deepseek-7b-logs-v2",
            "python": _SG + "finetuned-fim-lang-py-model-deepseek-7b-logs-v2",
            "typescriptreact": _SG + "finetuned-fim-lang-tsx-jsx-model-deepseek-7b-logs-v2",
            "javascriptreact": _SG + "finetuned-fim-lang-tsx-jsx-model-deepseek-7b-logs-v2",
        },
        DEEPSEEK_CODER_7B,
    ),
    "fim-lang-specific-model-mixtral": (
        {
            "typescript": _SG + "finetuned-fim-lang-typescript-model-mixtral-8x7b",
            "typescriptreact": _SG + "finetuned-fim-lang-typescript-model-mixtral-8x7b",
            "javascript": _SG + "finetuned-fim-lang-javascript-model-mixtral-8x7b",
            "javascriptreact": _SG + "finetuned-fim-lang-jsx-model-mixtral-8x7b",
            "php": _SG + "finetuned-fim-lang-php-model-mixtral-8x7b",
            "python": _SG + "finetuned-fim-lang-python-model-mixtral-8x7b",
        },
        _SG + "finetuned-fim-lang-all-model-mixtral-8x7b",
    ),
}


def split_traffic(percent: int, roll: int, hundred: str, zero: str) -> str:
    """``roll`` is uniform in [0, 100): percent 0 always gives ``zero``, 100 always ``hundred``."""
    return hundred if roll < percent else zero


def pick_starcoder(model: str, config: FireworksConfig, roll: int) -> str:
    if model == "starcoder":
        # The enterprise virtual name.
        return split_traffic(config.starcoder_enterprise_single_tenant_percent, roll, STARCODER_16B_SINGLE_TENANT, STARCODER_16B)
    if model in ("starcoder-16b", "starcoder-7b"):
        # The community virtual names.
        multi = STARCODER_16B if model == "starcoder-16b" else STARCODER_7B
        return split_traffic(config.starcoder_community_single_tenant_percent, roll, STARCODER_16B_SINGLE_TENANT, multi)
    if model == "starcoder2-15b":
        return STARCODER2_15B
    if model == "starcoder2-7b":
        return STARCODER2_7B
    return model


def pick_fine_tuned(model: str, language_id: str) -> str:
    entry = FINE_TUNED.get(model)
    if entry is None:
        return model
    by_language, fallback = entry
    return by_language.get(language_id, fallback)


def _virtual_targets() -> dict[str, frozenset[str]]:
    starcoder = {STARCODER_7B, STARCODER_16B, STARCODER_7B_8BIT, STARCODER_16B_8BIT, STARCODER_16B_SINGLE_TENANT}
    targets: dict[str, set[str]] = {
        "starcoder": starcoder,
        "starcoder-16b": {STARCODER_16B, STARCODER_16B_SINGLE_TENANT},
        "starcoder-7b": {STARCODER_7B, STARCODER_16B_SINGLE_TENANT},
        "starcoder2-15b": {STARCODER2_15B},
        "starcoder2-7b": {STARCODER2_7B},
    }
    for name, (by_language, fallback) in FINE_TUNED.items():
        targets[name] = {*by_language.values(), fallback}
    return {
        f"{PROVIDER}/{name}".lower(): frozenset(f"{PROVIDER}/{t}".lower() for t in ids)
        for name, ids in targets.items()
    }


def _content(value: Any, path: str, chat: bool) -> tuple[Any, str]:
    """(what to forward, its text): a string, or (chat) a list of content parts."""
    if value is None:
        return "", ""
    if isinstance(value, str):
        return value, value
    if chat and isinstance(value, list):
        return message_content(value, path)
    raise BadRequest(f"failed to parse request body: field {path!r} must be a string")


class FireworksCall(OpenAIStyleCall):
    # True when the client asked Fireworks to trace the request (X-Fireworks-Genie:
    # true); the reference counts these in cody-gateway.fireworks-traced-requests.
    traced = False

    def stream_error_event(self, message: str) -> bytes:
        payload = orjson.dumps({"error": {"object": "error", "type": "internal_server_error", "message": message}})
        return b"data: " + payload + b"\n\n"


class FireworksProvider:
    name = PROVIDER
    operation = "v1.completions.fireworks"
    # Longer than any client's retry cap on purpose: the provider's quota is shared.
    default_retry_after_s = 30

    def __init__(
        self,
        config: FireworksConfig,
        *,
        max_messages: int,
        roll: Callable[[], int] = lambda: random.randrange(100),
    ) -> None:
        self._config = config
        base = config.api_url.rstrip("/")
        self._chat_url = base + "/inference/v1/chat/completions"
        self._text_url = base + "/inference/v1/completions"
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {config.access_token}", **IDENTITY_ENCODING}
        self._traced_headers = {**self._headers, "X-Fireworks-Genie": "true"}
        self._max_messages = max_messages
        self._roll = roll
        self._virtual = _virtual_targets()
        self.allowed_models = tuple(f"{PROVIDER}/{m}" for m in config.allowed_models)

    def virtual_models(self) -> dict[str, frozenset[str]]:
        return self._virtual

    def parse(
        self, body: bytes, *, feature: str, identifier: str, headers: Mapping[str, str]
    ) -> FireworksCall:
        raw_data = parse_body(body)
        chat = feature == CHAT_COMPLETIONS
        data = known_fields(raw_data, REQUEST_FIELDS if chat else CORE_FIELDS)
        prompt = opt_str(data, "prompt") or ""
        raw_messages = opt_list(data, "messages")
        messages: list[dict[str, Any]] | None = None
        texts: list[str] = []
        if raw_messages is not None:
            if len(raw_messages) > self._max_messages:
                raise BadRequest(f"too many messages: {len(raw_messages)} (at most {self._max_messages})")
            messages = []
            for i, raw in enumerate(raw_messages):
                msg = require_object(raw, f"messages[{i}]")
                content, text = _content(msg.get("content"), f"messages[{i}].content", chat)
                entry: dict[str, Any] = {"role": opt_str(msg, "role", f"messages[{i}].role") or "", "content": content}
                if chat:
                    entry.update(message_extras(msg, f"messages[{i}]"))
                messages.append(entry)
                texts.append(text)
        requested_model = opt_str(data, "model") or ""
        language_id = opt_str(data, "languageId") or ""
        stream = bool(opt_bool(data, "stream"))
        n = at_least_one(opt_int(data, "n"), "n")
        max_tokens = at_least_one(opt_int(data, "max_tokens"), "max_tokens")

        unresolved = requested_model.removeprefix(f"{PROVIDER}/")
        model = pick_fine_tuned(pick_starcoder(unresolved, self._config, self._roll()), language_id)

        upstream: dict[str, Any] = {}
        if prompt:
            upstream["prompt"] = prompt
        if messages:
            upstream["messages"] = messages
        upstream["model"] = model
        for key, value in (
            ("max_tokens", max_tokens),
            ("temperature", opt_number(data, "temperature")),
            ("top_p", opt_number(data, "top_p")),
            # More than one choice would multiply the cost of one admitted request.
            ("n", None if n is None else min(n, 1)),
        ):
            if value is not None:
                upstream[key] = value
        if stream:
            upstream["stream"] = True
        if opt_bool(data, "echo"):
            upstream["echo"] = True
        stop = opt_str_list(data, "stop")
        if stop:
            upstream["stop"] = stop
        if chat:
            upstream.update(passthrough(data, CHAT_PASSTHROUGH_FIELDS))

        if prompt:
            flat = prompt
        else:
            flat = "".join(text + "\n" for text in texts)
        traced = headers.get("X-Fireworks-Genie", "").strip() == "true"
        call = FireworksCall(
            UpstreamRequest(
                url=self._chat_url if feature == CHAT_COMPLETIONS else self._text_url,
                headers=self._traced_headers if traced else self._headers,
                body=json_body(upstream),
            ),
            CallInfo(
                model=model,
                stream=stream,
                metadata={"stream": stream},
                max_tokens=max_tokens,
                dropped_fields=dropped_fields(raw_data, REQUEST_FIELDS, kept=data),
            ),
            FlagInput(model=unresolved, prompt=flat, max_tokens=max_tokens or 0, uses_tokenizer=False),
            prompt_chars=len(prompt) if prompt else sum(len(t) for t in texts),
            prompt_text=flat,
        )
        call.traced = traced
        return call
