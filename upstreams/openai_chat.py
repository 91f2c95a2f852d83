"""OpenAI chat completions: POST /v1/completions/openai (and the SDK-compatible
POST /openai/v1/chat/completions) -> {api_url}/v1/chat/completions.

Reference section 4.4, with these deliberate fixes:
- zero values the client sent are forwarded, not dropped;
- ``content`` may be a string or a list of text parts (what the official SDK
  may send); other part types get a clear 400 instead of being half-dropped;
  ``stop`` may be a string or a list, as the API allows;
- ``max_completion_tokens`` (the API's current name) and ``stream_options``
  are known fields: a client that asks for streamed usage gets it, and then
  the count is the provider's own;
- completion characters are counted from ``message.content`` (the reference
  read a field that does not exist, so it counted 0);
- a stream without a usage chunk is counted with the offline tokenizer, never -1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from actors.model import CODE_COMPLETIONS
from conf.model import OpenAIConfig
from errors import BadRequest
from upstreams.base import CallInfo, FlagInput, UpstreamRequest, json_body
from upstreams.buffered_call import BufferedCall, at_least_one
from upstreams.decode import (
    known_fields,
    opt_bool,
    opt_int,
    opt_list,
    opt_number,
    opt_object,
    opt_str,
    parse_body,
    require_object,
)

PROVIDER = "openai"
REQUEST_FIELDS = (
    "model", "messages", "temperature", "top_p", "n", "stream", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "user",
    "stream_options",
)


def _content(value: Any, path: str) -> tuple[Any, str]:
    """(what to forward, its text) for a message's content."""
    if value is None:
        return "", ""
    if isinstance(value, str):
        return value, value
    if not isinstance(value, list):
        raise BadRequest(f"failed to parse request body: field {path!r} must be a string or a list of parts")
    parts: list[dict[str, str]] = []
    for i, raw in enumerate(value):
        part = require_object(raw, f"{path}[{i}]")
        kind = opt_str(part, "type", f"{path}[{i}].type") or "text"
        if kind != "text":
            raise BadRequest(f"content part type {kind!r} is not supported by the gateway")
        parts.append({"type": "text", "text": opt_str(part, "text", f"{path}[{i}].text") or ""})
    return parts, "".join(p["text"] for p in parts)


def _stop(data: Mapping[str, Any]) -> str | list[str] | None:
    value = data.get("stop")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise BadRequest("failed to parse request body: field 'stop' must be a string or a list of strings")


def _logit_bias(data: Mapping[str, Any]) -> dict[str, Any] | None:
    bias = opt_object(data, "logit_bias")
    if bias is None:
        return None
    for key, value in bias.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"failed to parse request body: logit_bias[{key!r}] must be a number")
    return bias


class OpenAIChatCall(BufferedCall):
    def _on_event(self, name: bytes, data: bytes) -> None:
        event = self._json(data)
        if event is None:
            return
        if self._took_error(event, "choices"):
            return
        choices = event.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                text = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(text, str):
                    self._add_text(text)
        self._read_usage(event.get("usage"))

    def _on_body(self, data: dict[str, Any]) -> None:
        choices = data.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                message = choice.get("message") if isinstance(choice, dict) else None
                text = message.get("content") if isinstance(message, dict) else None
                self._add_text(text if isinstance(text, str) else "")
        self._read_usage(data.get("usage"))

    def stream_error_event(self, message: str) -> bytes:
        payload = orjson.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
        return b"data: " + payload + b"\n\n"


class OpenAIChatProvider:
    name = PROVIDER
    operation = "v1.completions.openai"
    # Longer than any client's retry cap on purpose: OpenAI's quota is shared.
    default_retry_after_s = 30

    def __init__(self, config: OpenAIConfig, *, max_messages: int) -> None:
        self._url = config.api_url.rstrip("/") + "/v1/chat/completions"
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {config.access_token}"}
        if config.org_id:
            self._headers["OpenAI-Organization"] = config.org_id
        self._max_messages = max_messages
        self.allowed_models = tuple(f"{PROVIDER}/{m}" for m in config.allowed_models)

    def virtual_models(self) -> dict[str, frozenset[str]]:
        return {}

    def parse(
        self, body: bytes, *, feature: str, identifier: str, headers: Mapping[str, str]
    ) -> OpenAIChatCall:
        data = known_fields(parse_body(body), REQUEST_FIELDS)
        if feature == CODE_COMPLETIONS:
            raise BadRequest(f'feature "{feature}" is currently not supported for OpenAI')
        raw_messages = opt_list(data, "messages") or []
        if len(raw_messages) > self._max_messages:
            raise BadRequest(f"too many messages: {len(raw_messages)} (at most {self._max_messages})")
        messages: list[dict[str, Any]] = []
        texts: list[str] = []
        for i, raw in enumerate(raw_messages):
            msg = require_object(raw, f"messages[{i}]")
            content, text = _content(msg.get("content"), f"messages[{i}].content")
            out: dict[str, Any] = {"role": opt_str(msg, "role", f"messages[{i}].role") or "", "content": content}
            name = opt_str(msg, "name", f"messages[{i}].name")
            if name:
                out["name"] = name
            messages.append(out)
            texts.append(text)

        requested_model = opt_str(data, "model") or ""
        model = requested_model.removeprefix(f"{PROVIDER}/")
        stream = bool(opt_bool(data, "stream"))
        n = at_least_one(opt_int(data, "n"), "n")
        max_tokens = at_least_one(opt_int(data, "max_tokens"), "max_tokens")
        max_completion_tokens = at_least_one(opt_int(data, "max_completion_tokens"), "max_completion_tokens")
        upstream: dict[str, Any] = {"model": model, "messages": messages}
        for key, value in (
            ("temperature", opt_number(data, "temperature")),
            ("top_p", opt_number(data, "top_p")),
            # More than one choice would multiply the cost of one admitted request.
            ("n", None if n is None else min(n, 1)),
            ("stop", _stop(data)),
            ("max_tokens", max_tokens),
            ("max_completion_tokens", max_completion_tokens),
            ("presence_penalty", opt_number(data, "presence_penalty")),
            ("frequency_penalty", opt_number(data, "frequency_penalty")),
            ("logit_bias", _logit_bias(data)),
        ):
            if value is not None:
                upstream[key] = value
        if stream:
            upstream["stream"] = True
            options = opt_object(data, "stream_options")
            include_usage = None if options is None else opt_bool(options, "include_usage", "stream_options.include_usage")
            if include_usage is not None:
                upstream["stream_options"] = {"include_usage": include_usage}
        upstream["user"] = identifier

        prompt = "".join(text + "\n" for text in texts)
        limit = max_completion_tokens if max_completion_tokens is not None else max_tokens
        return OpenAIChatCall(
            UpstreamRequest(url=self._url, headers=self._headers, body=json_body(upstream)),
            CallInfo(model=model, stream=stream, metadata={"stream": stream}, max_tokens=limit),
            FlagInput(model=model, prompt=prompt, max_tokens=limit or 0, uses_tokenizer=False),
            prompt_chars=sum(len(t) for t in texts),
            prompt_text=prompt,
        )
