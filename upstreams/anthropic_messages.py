"""Anthropic Messages: POST /v1/completions/anthropic-messages -> {api_url}/v1/messages.

Reference section 4.3, with these deliberate fixes and extensions (SPEC point 13):
- zero values the client sent (``temperature: 0``) are forwarded, not dropped;
- a top-level ``system`` from the client (what the official SDK sends) is kept;
  a leading ``system`` message is hoisted into it (and joined after it if both exist);
- every content block type the API takes is forwarded unchanged (text,
  image, document, tool_use, tool_result, thinking, redacted_thinking,
  search_result, server-tool blocks, ``cache_control`` on any block); the
  gateway reads only their text (flagging, tokenizer fallback) and checks
  their structure (objects with a string ``type``, bounded counts and
  nesting): a malformed block is a 400 naming its path;
- a text-only request is forwarded exactly as before (text blocks as
  ``{"type": "text", "text": ...}``, a system of plain text blocks joined
  into one string), so its upstream request is byte-identical to the
  reference's;
- the documented top-level fields (``REQUEST_FIELDS``) are forwarded; unknown
  ones are dropped, as the reference does, and reported in
  ``CallInfo.dropped_fields`` for the unknown-fields metric;
- ``anthropic-beta`` is forwarded when every value is allowed
  (``providers.anthropic.allowed_betas``; ``*`` allows all), otherwise a 400;
- ``max_tokens`` is capped per model (``providers.anthropic.max_tokens_caps``,
  first matching pattern; ``max_tokens_to_sample`` for the others); with
  extended thinking, ``budget_tokens`` is part of ``max_tokens`` and must be
  below it, as the API defines (unless the interleaved-thinking beta is on);
- prompt characters count characters, not content parts;
- usage is read by component (cache reads, cache writes) and the
  ``message_start`` placeholder ``output_tokens`` is provisional.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import orjson

from actors.limits import glob_match
from conf.model import AnthropicConfig
from errors import BadRequest
from upstreams.base import IDENTITY_ENCODING, CallInfo, FlagInput, UpstreamRequest, json_body
from upstreams.buffered_call import BufferedCall, usage_count
from upstreams.decode import (
    check_nesting,
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

PROVIDER = "anthropic"
API_VERSION = "2023-06-01"
# The request fields the gateway reads itself, in the order it writes them
# (the reference's order, so a text-only request is byte-identical).
CORE_FIELDS = (
    "model", "messages", "max_tokens", "temperature", "top_p", "top_k",
    "stream", "stop_sequences", "metadata", "system",
)
# The other top-level fields of the Messages API, forwarded as sent (after a
# structure check), in this order after the core ones. They follow the API as
# documented on 2026-12-01 (anthropic SDK 2.17.0, MessageCreateParams, plus
# the beta fields context_management, mcp_servers and output_format).
# Keep this the one list: the README and docs/providers.md point here.
PASSTHROUGH_FIELDS: dict[str, type] = {
    "tools": list,
    "tool_choice": dict,
    "thinking": dict,
    "cache_control": dict,
    "service_tier": str,
    "container": object,
    "inference_geo": str,
    "output_config": dict,
    "output_format": dict,
    "speed": str,
    "context_management": dict,
    "mcp_servers": list,
    "diagnostics": dict,
}
REQUEST_FIELDS = CORE_FIELDS + tuple(PASSTHROUGH_FIELDS)
# What POST /v1/messages/count_tokens takes (same docs date).
COUNT_TOKENS_FIELDS = (
    "model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers", "context_management",
    "output_config", "output_format",
)
_ROLE_LABELS = {"user": "Human: ", "assistant": "Assistant: ", "system": "System: "}
# Bounds on what one request may carry (far above real use).
MAX_BLOCKS = 10_000
MAX_BETAS = 32
MAX_TYPE_CHARS = 64
INTERLEAVED_THINKING_BETA = "interleaved-thinking-2025-05-14"


# A message's (or the system's) content: (what to forward, its text, plain),
# plain meaning only text blocks without extra keys (what the reference could express).
_Content = tuple[list[dict[str, Any]] | str, str, bool]


def _block_text(block: Mapping[str, Any], kind: str, path: str) -> str:
    """The text the gateway reads from a non-text block (tool results, search results)."""
    if kind not in ("tool_result", "search_result"):
        return ""
    nested = block.get("content")
    if isinstance(nested, str):
        return nested
    if not isinstance(nested, list):
        return ""
    parts: list[str] = []
    for i, item in enumerate(nested):
        inner = require_object(item, f"{path}.content[{i}]")
        inner_kind = opt_str(inner, "type", f"{path}.content[{i}].type")
        if inner_kind == "text":
            parts.append(opt_str(inner, "text", f"{path}.content[{i}].text") or "")
    return "".join(parts)


def _content(content: Any, path: str) -> _Content:
    if isinstance(content, str):
        return content, content, True
    if not isinstance(content, list):
        raise BadRequest(f"failed to parse request body: field {path!r} must be a string or a list of blocks")
    if len(content) > MAX_BLOCKS:
        raise BadRequest(f"failed to parse request body: field {path!r} has more than {MAX_BLOCKS} blocks")
    blocks: list[dict[str, Any]] = []
    texts: list[str] = []
    plain = True
    for i, raw in enumerate(content):
        where = f"{path}[{i}]"
        block = require_object(raw, where)
        kind = opt_str(block, "type", f"{where}.type") or "text"
        if kind == "text":
            text = opt_str(block, "text", f"{where}.text") or ""
            texts.append(text)
            out: dict[str, Any] = {"type": "text", "text": text}
            for key, value in block.items():
                if key not in ("type", "text"):
                    out[key] = value
            if len(out) > 2:
                plain = False
                check_nesting(out, where)
                _check_cache_control(out, where)
            blocks.append(out)
            continue
        if len(kind) > MAX_TYPE_CHARS:
            raise BadRequest(f"failed to parse request body: field '{where}.type' is too long")
        plain = False
        check_nesting(block, where)
        _check_cache_control(block, where)
        texts.append(_block_text(block, kind, where))
        blocks.append(block)
    return blocks, "".join(texts), plain


def _check_cache_control(block: Mapping[str, Any], path: str) -> None:
    value = block.get("cache_control")
    if value is not None and not isinstance(value, dict):
        raise BadRequest(f"failed to parse request body: field '{path}.cache_control' must be an object")


def _thinking_budget(thinking: Mapping[str, Any] | None) -> int | None:
    if thinking is None:
        return None
    kind = opt_str(thinking, "type", "thinking.type")
    if kind != "enabled":
        return None
    budget = opt_int(thinking, "budget_tokens", "thinking.budget_tokens")
    if budget is not None and budget < 1:
        raise BadRequest(f"thinking.budget_tokens must be at least 1: {budget}")
    return budget


def parse_betas(raw: str | None, allowed: frozenset[str]) -> list[str]:
    """The ``anthropic-beta`` values, each checked against ``allowed`` (``*``: any)."""
    if raw is None:
        return []
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if len(values) > MAX_BETAS:
        raise BadRequest(f"too many anthropic-beta values: {len(values)} (at most {MAX_BETAS})")
    if "*" in allowed:
        for value in values:
            if len(value) > 128:
                raise BadRequest("anthropic-beta value is too long")
        return values
    for value in values:
        if value.lower() not in allowed:
            raise BadRequest(f"anthropic-beta value {value[:128]!r} is not allowed")
    return values


def max_tokens_cap(config: AnthropicConfig) -> Callable[[str], int]:
    """model -> its max_tokens cap: the first matching pattern, else max_tokens_to_sample."""
    caps = config.max_tokens_caps
    fallback = config.max_tokens_to_sample

    @lru_cache(maxsize=1024)
    def cap(model: str) -> int:
        for pattern, value in caps:
            if glob_match(model, pattern):
                return value
        return fallback

    return cap


class AnthropicMessagesCall(BufferedCall):
    def _on_event(self, name: bytes, data: bytes) -> None:
        # Only the events that carry usage or output are decoded.
        if name == b"content_block_delta":
            text = _plain_delta_text(data)
            if text is not None:
                self._add_text(text)
                return
            event = self._json(data)
            delta = event.get("delta") if event else None
            if isinstance(delta, dict):
                # Text, thinking and tool input are all output the model produced.
                for key in ("text", "thinking", "partial_json"):
                    value = delta.get(key)
                    if isinstance(value, str):
                        self._add_text(value)
                        break
        elif name == b"message_start":
            event = self._json(data)
            message = event.get("message") if event else None
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._set_prompt_tokens(usage)
                # A placeholder (usually 1): the real count comes in message_delta.
                output_tokens = usage_count(usage.get("output_tokens"))
                if output_tokens is not None and self._usage.completion_tokens is None:
                    self._set_provisional_completion(output_tokens)
        elif name == b"message_delta":
            event = self._json(data)
            usage = event.get("usage") if event else None
            if isinstance(usage, dict):
                output_tokens = usage_count(usage.get("output_tokens"))
                if output_tokens is not None:
                    self._usage.completion_tokens = output_tokens
                self._set_prompt_tokens(usage)
        elif name == b"error":
            event = self._json(data)
            error = event.get("error") if event else None
            message = error.get("message") if isinstance(error, dict) else None
            self.in_band_error = str(message or "error")

    def _on_body(self, data: dict[str, Any]) -> None:
        for block in data.get("content") or []:
            if not isinstance(block, dict):
                continue
            if isinstance(block.get("text"), str):
                self._add_text(block["text"])
            elif isinstance(block.get("thinking"), str):
                self._add_text(block["thinking"])
            elif block.get("type") == "tool_use" and "input" in block:
                try:
                    self._add_text(orjson.dumps(block["input"]).decode())
                except orjson.JSONEncodeError:
                    pass
        usage = data.get("usage")
        if isinstance(usage, dict):
            self._set_prompt_tokens(usage)
            self._usage.completion_tokens = usage_count(usage.get("output_tokens"))

    def _set_prompt_tokens(self, usage: Mapping[str, Any]) -> None:
        input_tokens = usage_count(usage.get("input_tokens"))
        cache_read = usage_count(usage.get("cache_read_input_tokens"))
        cache_creation = usage_count(usage.get("cache_creation_input_tokens"))
        if cache_read is not None:
            self._usage.cache_read_tokens = cache_read
        if cache_creation is not None:
            self._usage.cache_creation_tokens = cache_creation
        if input_tokens is not None:
            # Cached prompt tokens are billed prompt tokens too; Anthropic reports them apart.
            self._usage.prompt_tokens = input_tokens + (cache_read or 0) + (cache_creation or 0)

    def stream_error_event(self, message: str) -> bytes:
        payload = orjson.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
        return b"event: error\ndata: " + payload + b"\n\n"


class AnthropicMessagesProvider:
    name = PROVIDER
    operation = "v1.completions.anthropicmessages"
    default_retry_after_s = 2

    def __init__(self, config: AnthropicConfig, *, max_messages: int) -> None:
        self._config = config
        self._url = config.api_url.rstrip("/") + "/v1/messages"
        self.count_tokens_url = config.api_url.rstrip("/") + "/v1/messages/count_tokens"
        self._headers = {
            "Content-Type": "application/json",
            "X-API-Key": config.access_token,
            "anthropic-version": API_VERSION,
            **IDENTITY_ENCODING,
        }
        self._max_messages = max_messages
        self._allowed_betas = frozenset(b.lower() for b in config.allowed_betas)
        self.max_tokens_cap = max_tokens_cap(config)
        self.allowed_models = tuple(f"{PROVIDER}/{m}" for m in config.allowed_models)

    def virtual_models(self) -> dict[str, frozenset[str]]:
        return {}

    def headers_for(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The upstream headers, with the client's allowed ``anthropic-beta`` values."""
        betas = parse_betas(headers.get("anthropic-beta"), self._allowed_betas)
        if not betas:
            return self._headers
        return {**self._headers, "anthropic-beta": ",".join(betas)}

    def parse(
        self, body: bytes, *, feature: str, identifier: str, headers: Mapping[str, str]
    ) -> AnthropicMessagesCall:
        raw = parse_body(body)
        data = known_fields(raw, REQUEST_FIELDS)
        upstream_headers = self.headers_for(headers)
        raw_messages = self._messages(data)
        messages: list[dict[str, Any]] = []
        texts: list[str] = []
        for i, raw_message in enumerate(raw_messages):
            msg = require_object(raw_message, f"messages[{i}]")
            role = opt_str(msg, "role", f"messages[{i}].role") or ""
            value = msg.get("content", [])
            if isinstance(value, str):
                messages.append({"role": role, "content": value})
                texts.append(value)
                continue
            forward, text, _plain = _content(value, f"messages[{i}].content")
            messages.append({"role": role, "content": forward})
            texts.append(text)

        model = (opt_str(data, "model") or "").removeprefix(f"{PROVIDER}/")
        max_tokens = opt_int(data, "max_tokens")
        cap = self.max_tokens_cap(model)
        if max_tokens is not None and max_tokens > cap:
            raise BadRequest(f"max_tokens exceeds maximum allowed value of {cap}: {max_tokens}")
        if max_tokens is not None and max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1: {max_tokens}")
        extra = passthrough(data, PASSTHROUGH_FIELDS)
        budget = _thinking_budget(extra.get("thinking"))
        if (
            budget is not None
            and max_tokens is not None
            and budget >= max_tokens
            and INTERLEAVED_THINKING_BETA not in upstream_headers.get("anthropic-beta", "")
        ):
            raise BadRequest(f"thinking.budget_tokens must be less than max_tokens: {budget} >= {max_tokens}")
        stream = bool(opt_bool(data, "stream"))
        system_value = data.get("system")
        system: list[dict[str, Any]] | str = ""
        system_text = ""
        if system_value is not None:
            system_forward, system_text, plain = _content(system_value, "system")
            # Plain text blocks are joined into one string, as the reference sent them.
            system = system_text if plain else system_forward

        prompt = _flatten(messages, texts)
        if messages and messages[0]["role"] == "system":
            messages.pop(0)
            hoisted = texts.pop(0)
            if isinstance(system, list):
                system = [*system, {"type": "text", "text": hoisted}]
            else:
                system = f"{system}\n\n{hoisted}" if system else hoisted
            system_text = f"{system_text}\n\n{hoisted}" if system_text else hoisted

        upstream: dict[str, Any] = {"messages": messages, "model": model}
        for key, value in (
            ("max_tokens", max_tokens),
            ("temperature", opt_number(data, "temperature")),
            ("top_p", opt_number(data, "top_p")),
            ("top_k", opt_int(data, "top_k")),
            ("stop_sequences", opt_str_list(data, "stop_sequences")),
        ):
            if value is not None:
                upstream[key] = value
        if stream:
            upstream["stream"] = True
        # The client's metadata is never forwarded: user_id is ours (abuse tracing).
        upstream["metadata"] = {"user_id": identifier}
        if system:
            upstream["system"] = system
        upstream.update(extra)

        prompt_chars = sum(len(t) for t in texts) + len(system_text)
        metadata: dict[str, Any] = {"stream": stream, "max_tokens": max_tokens}
        return AnthropicMessagesCall(
            UpstreamRequest(url=self._url, headers=upstream_headers, body=json_body(upstream)),
            CallInfo(
                model=model,
                stream=stream,
                metadata=metadata,
                max_tokens=max_tokens,
                dropped_fields=dropped_fields(raw, REQUEST_FIELDS, kept=data),
            ),
            FlagInput(model=model, prompt=prompt, max_tokens=max_tokens or 0, uses_tokenizer=True),
            prompt_chars=prompt_chars,
            prompt_text=prompt,
        )

    def _messages(self, data: Mapping[str, Any]) -> list[Any]:
        raw_messages = opt_list(data, "messages")
        if raw_messages is None:
            raise BadRequest('request body must contain "messages" field')
        if len(raw_messages) > self._max_messages:
            raise BadRequest(f"too many messages: {len(raw_messages)} (at most {self._max_messages})")
        return raw_messages

    def count_tokens_request(self, body: bytes, headers: Mapping[str, str]) -> tuple[str, UpstreamRequest]:
        """(model, upstream request) for ``POST /v1/messages/count_tokens``: the same
        checks as a message, the body the API's count_tokens takes."""
        raw = parse_body(body)
        data = known_fields(raw, COUNT_TOKENS_FIELDS)
        upstream_headers = self.headers_for(headers)
        raw_messages = self._messages(data)
        for i, raw_message in enumerate(raw_messages):
            msg = require_object(raw_message, f"messages[{i}]")
            opt_str(msg, "role", f"messages[{i}].role")
            _content(msg.get("content", []), f"messages[{i}].content")
        if data.get("system") is not None:
            _content(data["system"], "system")
        for key, value in data.items():
            if key not in ("model", "messages"):
                check_nesting(value, key)
        model = (opt_str(data, "model") or "").removeprefix(f"{PROVIDER}/")
        data["model"] = model
        return model, UpstreamRequest(url=self.count_tokens_url, headers=upstream_headers, body=json_body(data))


def _flatten(messages: list[dict[str, Any]], texts: list[str]) -> str:
    """The reference's flattened prompt; an unknown role makes it empty."""
    parts: list[str] = []
    for message, text in zip(messages, texts):
        label = _ROLE_LABELS.get(message["role"])
        if label is None:
            return ""
        parts.append(label + text + "\n\n")
    return "".join(parts)


# How text and thinking deltas end on the wire, value last: ...,"delta":{"type":"text_delta","text":"Hello"}}
_DELTA_VALUE_STARTS = (b'"type":"text_delta","text":"', b'"type":"thinking_delta","thinking":"')
_DELTA_END = b'"}}'


def _plain_delta_text(data: bytes) -> str | None:
    """The text of a text or thinking delta without decoding its JSON, or None.

    Most of a stream's events are these; when the value is the delta's last
    field and holds no escape (no backslash), the bytes between its quotes
    are the text itself (an unescaped quote cannot occur inside a JSON
    string). Anything else (escapes, another field order, other deltas)
    returns None and is decoded in full.
    """
    if not data.endswith(_DELTA_END):
        return None
    for marker in _DELTA_VALUE_STARTS:
        start = data.find(marker)
        if start >= 0:
            value = data[start + len(marker) : -len(_DELTA_END)]
            if b"\\" in value or b'"' in value:
                return None
            try:
                return value.decode()
            except UnicodeDecodeError:
                return None
    return None
