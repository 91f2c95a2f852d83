"""Anthropic Messages: POST /v1/completions/anthropic-messages -> {api_url}/v1/messages.

Reference section 4.3, with these deliberate fixes:
- zero values the client sent (``temperature: 0``) are forwarded, not dropped;
- a top-level ``system`` from the client (what the official SDK sends) is kept;
  a leading ``system`` message is hoisted into it (and joined after it if both exist);
- ``content`` may be a string (SDK shorthand) or a list of text blocks; other
  block types get a clear 400 instead of an upstream error;
- prompt characters count characters, not content parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from conf.model import AnthropicConfig
from errors import BadRequest
from upstreams.base import CallInfo, FlagInput, UpstreamRequest, json_body
from upstreams.buffered_call import BufferedCall, usage_count
from upstreams.decode import (
    known_fields,
    opt_bool,
    opt_int,
    opt_list,
    opt_number,
    opt_str,
    opt_str_list,
    parse_body,
    require_object,
)

PROVIDER = "anthropic"
API_VERSION = "2023-06-01"
REQUEST_FIELDS = (
    "model", "messages", "max_tokens", "temperature", "top_p", "top_k",
    "stream", "stop_sequences", "metadata", "system",
)
_ROLE_LABELS = {"user": "Human: ", "assistant": "Assistant: ", "system": "System: "}


def _text_blocks(content: Any, path: str) -> list[dict[str, Any]] | str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"failed to parse request body: field {path!r} must be a string or a list of blocks")
    blocks: list[dict[str, Any]] = []
    for i, raw in enumerate(content):
        block = require_object(raw, f"{path}[{i}]")
        kind = opt_str(block, "type", f"{path}[{i}].type") or "text"
        if kind != "text":
            raise BadRequest(f"content block type {kind!r} is not supported by the gateway")
        blocks.append({"type": "text", "text": opt_str(block, "text", f"{path}[{i}].text") or ""})
    return blocks


def _joined_text(content: list[dict[str, Any]] | str) -> str:
    if isinstance(content, str):
        return content
    return "".join(block["text"] for block in content)


class AnthropicMessagesCall(BufferedCall):
    def _on_event(self, name: bytes, data: bytes) -> None:
        # Only the events that carry usage or text are decoded.
        if name == b"content_block_delta":
            event = self._json(data)
            delta = event.get("delta") if event else None
            if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                self._add_text(delta["text"])
        elif name == b"message_start":
            event = self._json(data)
            message = event.get("message") if event else None
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._set_prompt_tokens(usage)
                if self._usage.completion_tokens is None:
                    self._usage.completion_tokens = usage_count(usage.get("output_tokens"))
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
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                self._add_text(block["text"])
        usage = data.get("usage")
        if isinstance(usage, dict):
            self._set_prompt_tokens(usage)
            self._usage.completion_tokens = usage_count(usage.get("output_tokens"))

    def _set_prompt_tokens(self, usage: Mapping[str, Any]) -> None:
        input_tokens = usage_count(usage.get("input_tokens"))
        if input_tokens is not None:
            # Cached prompt tokens are billed prompt tokens too; Anthropic reports them apart.
            self._usage.prompt_tokens = (
                input_tokens
                + (usage_count(usage.get("cache_read_input_tokens")) or 0)
                + (usage_count(usage.get("cache_creation_input_tokens")) or 0)
            )

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
        self._headers = {
            "Content-Type": "application/json",
            "X-API-Key": config.access_token,
            "anthropic-version": API_VERSION,
        }
        self._max_messages = max_messages
        self.allowed_models = tuple(f"{PROVIDER}/{m}" for m in config.allowed_models)

    def virtual_models(self) -> dict[str, frozenset[str]]:
        return {}

    def parse(
        self, body: bytes, *, feature: str, identifier: str, headers: Mapping[str, str]
    ) -> AnthropicMessagesCall:
        data = known_fields(parse_body(body), REQUEST_FIELDS)
        raw_messages = opt_list(data, "messages")
        if raw_messages is None:
            raise BadRequest('request body must contain "messages" field')
        if len(raw_messages) > self._max_messages:
            raise BadRequest(f"too many messages: {len(raw_messages)} (at most {self._max_messages})")
        messages: list[dict[str, Any]] = []
        for i, raw in enumerate(raw_messages):
            msg = require_object(raw, f"messages[{i}]")
            role = opt_str(msg, "role", f"messages[{i}].role") or ""
            messages.append({"role": role, "content": _text_blocks(msg.get("content", []), f"messages[{i}].content")})

        model = opt_str(data, "model") or ""
        max_tokens = opt_int(data, "max_tokens")
        if max_tokens is not None and max_tokens > self._config.max_tokens_to_sample:
            raise BadRequest(
                f"max_tokens exceeds maximum allowed value of {self._config.max_tokens_to_sample}: {max_tokens}"
            )
        if max_tokens is not None and max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1: {max_tokens}")
        stream = bool(opt_bool(data, "stream"))
        system_value = data.get("system")
        system = "" if system_value is None else _joined_text(_text_blocks(system_value, "system"))

        prompt = _flatten(messages)
        if messages and messages[0]["role"] == "system":
            hoisted = _joined_text(messages.pop(0)["content"])
            system = f"{system}\n\n{hoisted}" if system else hoisted
        model = model.removeprefix(f"{PROVIDER}/")

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
        upstream["metadata"] = {"user_id": identifier}
        if system:
            upstream["system"] = system

        prompt_chars = sum(len(_joined_text(m["content"])) for m in messages) + len(system)
        call = AnthropicMessagesCall(
            UpstreamRequest(url=self._url, headers=self._headers, body=json_body(upstream)),
            CallInfo(
                model=model,
                stream=stream,
                metadata={"stream": stream, "max_tokens": max_tokens},
                max_tokens=max_tokens,
            ),
            FlagInput(model=model, prompt=prompt, max_tokens=max_tokens or 0, uses_tokenizer=True),
            prompt_chars=prompt_chars,
            prompt_text=prompt,
        )
        return call


def _flatten(messages: list[dict[str, Any]]) -> str:
    """The reference's flattened prompt; an unknown role makes it empty."""
    parts: list[str] = []
    for message in messages:
        label = _ROLE_LABELS.get(message["role"])
        if label is None:
            return ""
        parts.append(label + _joined_text(message["content"]) + "\n\n")
    return "".join(parts)
