"""OpenAI chat completions: POST /v1/completions/openai (and the SDK-compatible
POST /openai/v1/chat/completions) -> {api_url}/v1/chat/completions.

Reference section 4.4, with these deliberate fixes and extensions (SPEC point 13):
- zero values the client sent are forwarded, not dropped;
- ``content`` may be a string or a list of parts: text parts are forwarded as
  ``{"type": "text", "text": ...}`` (as before), other parts (``image_url``,
  ``input_audio``, ``file``, ``refusal``) as sent, after a structure check;
  ``tool`` messages (``tool_call_id``) and assistant ``tool_calls`` are kept;
  ``stop`` may be a string or a list, as the API allows;
- the documented request fields (``PASSTHROUGH_FIELDS``: tools,
  response_format, reasoning_effort, ...) are forwarded; unknown ones are
  dropped as the reference does and reported in ``CallInfo.dropped_fields``;
- streams always ask the upstream for usage (``stream_options.include_usage``);
  when the client did not ask for it, the usage-only chunk (and the
  ``"usage":null`` the upstream then adds to every chunk) is removed from what
  is relayed, so the client sees what it would have seen while the event
  carries the provider's exact counts (reasoning tokens included);
- ``n`` is capped at ``providers.openai.max_choices`` (1, as in the reference);
- completion characters are counted from ``message.content`` (the reference
  read a field that does not exist, so it counted 0);
- a stream without a usage chunk is counted with the offline tokenizer, never -1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from actors.model import CODE_COMPLETIONS
from conf.model import OpenAIConfig
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
    opt_object,
    opt_str,
    parse_body,
    passthrough,
    require_object,
)
from upstreams.openai_wire import OpenAIStyleCall, message_content, message_extras

PROVIDER = "openai"
CORE_FIELDS = (
    "model", "messages", "temperature", "top_p", "n", "stream", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "user",
    "stream_options",
)
# The other request fields of the Chat Completions API, forwarded as sent
# (after a structure check), in this order after the core ones. They follow
# the API as documented on 2026-12-01 (openai SDK 3.63.0,
# CompletionCreateParams). ``user`` is always the gateway's identifier.
PASSTHROUGH_FIELDS: dict[str, type] = {
    "tools": list,
    "tool_choice": object,
    "parallel_tool_calls": bool,
    "response_format": dict,
    "reasoning_effort": str,
    "verbosity": str,
    "seed": int,
    "logprobs": bool,
    "top_logprobs": int,
    "prediction": dict,
    "modalities": list,
    "audio": dict,
    "service_tier": str,
    "store": bool,
    "metadata": dict,
    "web_search_options": dict,
    "prompt_cache_key": str,
    "prompt_cache_retention": str,
    "safety_identifier": str,
    "functions": list,
    "function_call": object,
}
REQUEST_FIELDS = CORE_FIELDS + tuple(PASSTHROUGH_FIELDS)


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


class OpenAIChatCall(OpenAIStyleCall):
    # True when the gateway asked for stream usage the client did not ask for:
    # the usage-only chunk (and "usage":null on every chunk) is not relayed.
    strip_usage = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes | None:
        super().feed(chunk)
        if not self.strip_usage:
            return None
        data = self._pending + chunk if self._pending else chunk
        end = _last_event_end(data)
        if end < len(data):
            # Only whole events are relayed (an event is filtered as a whole).
            self._pending = data[end:]
            data = data[:end]
        else:
            self._pending = b""
        if b'"usage"' not in data:
            return data
        return _strip_usage(data)

    def stream_error_event(self, message: str) -> bytes:
        payload = orjson.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
        return b"data: " + payload + b"\n\n"


_EVENT_SPLIT = re.compile(rb"(?<=\n\n)|(?<=\r\n\r\n)")


def _last_event_end(data: bytes) -> int:
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _strip_usage(data: bytes) -> bytes:
    """Whole SSE events minus the usage-only chunk and the ``"usage":null`` members."""
    out: list[bytes] = []
    for event in _EVENT_SPLIT.split(data):
        if not event:
            continue
        if b'"usage":{' in event.replace(b'"usage": {', b'"usage":{') and (
            b'"choices":[]' in event or b'"choices": []' in event
        ):
            continue
        out.append(event.replace(b',"usage":null', b"").replace(b', "usage": null', b""))
    return b"".join(out)


class OpenAIChatProvider:
    name = PROVIDER
    operation = "v1.completions.openai"
    # Longer than any client's retry cap on purpose: OpenAI's quota is shared.
    default_retry_after_s = 30

    def __init__(self, config: OpenAIConfig, *, max_messages: int) -> None:
        self._url = config.api_url.rstrip("/") + "/v1/chat/completions"
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {config.access_token}", **IDENTITY_ENCODING}
        if config.org_id:
            self._headers["OpenAI-Organization"] = config.org_id
        self._max_messages = max_messages
        self._max_choices = config.max_choices
        self.allowed_models = tuple(f"{PROVIDER}/{m}" for m in config.allowed_models)

    def virtual_models(self) -> dict[str, frozenset[str]]:
        return {}

    def parse(
        self, body: bytes, *, feature: str, identifier: str, headers: Mapping[str, str]
    ) -> OpenAIChatCall:
        raw_data = parse_body(body)
        data = known_fields(raw_data, REQUEST_FIELDS)
        if feature == CODE_COMPLETIONS:
            raise BadRequest(f'feature "{feature}" is currently not supported for OpenAI')
        raw_messages = opt_list(data, "messages") or []
        if len(raw_messages) > self._max_messages:
            raise BadRequest(f"too many messages: {len(raw_messages)} (at most {self._max_messages})")
        messages: list[dict[str, Any]] = []
        texts: list[str] = []
        for i, raw in enumerate(raw_messages):
            msg = require_object(raw, f"messages[{i}]")
            raw_content = msg.get("content")
            if isinstance(raw_content, str):
                content, text = raw_content, raw_content
            else:
                content, text = message_content(raw_content, f"messages[{i}].content")
            out: dict[str, Any] = {"role": opt_str(msg, "role", f"messages[{i}].role") or "", "content": content}
            name = opt_str(msg, "name", f"messages[{i}].name")
            if name:
                out["name"] = name
            if "tool_calls" in msg or "tool_call_id" in msg:
                extras = message_extras(msg, f"messages[{i}]")
                if raw_content is None and "tool_calls" in extras:
                    out["content"] = None
                out.update(extras)
            messages.append(out)
            texts.append(text)

        requested_model = opt_str(data, "model") or ""
        model = requested_model.removeprefix(f"{PROVIDER}/")
        stream = bool(opt_bool(data, "stream"))
        n = at_least_one(opt_int(data, "n"), "n")
        max_tokens = at_least_one(opt_int(data, "max_tokens"), "max_tokens")
        max_completion_tokens = at_least_one(opt_int(data, "max_completion_tokens"), "max_completion_tokens")
        extra = passthrough(data, PASSTHROUGH_FIELDS)
        upstream: dict[str, Any] = {"model": model, "messages": messages}
        for key, value in (
            ("temperature", opt_number(data, "temperature")),
            ("top_p", opt_number(data, "top_p")),
            # More than one choice would multiply the cost of one admitted request.
            ("n", None if n is None else min(n, self._max_choices)),
            ("stop", _stop(data)),
            ("max_tokens", max_tokens),
            ("max_completion_tokens", max_completion_tokens),
            ("presence_penalty", opt_number(data, "presence_penalty")),
            ("frequency_penalty", opt_number(data, "frequency_penalty")),
            ("logit_bias", _logit_bias(data)),
        ):
            if value is not None:
                upstream[key] = value
        client_wants_usage = False
        if stream:
            upstream["stream"] = True
            options = opt_object(data, "stream_options")
            include_usage = None if options is None else opt_bool(options, "include_usage", "stream_options.include_usage")
            client_wants_usage = include_usage is True
            # Always asked for: the provider's own counts, hidden reasoning tokens included.
            upstream["stream_options"] = {"include_usage": True}
        upstream["user"] = identifier
        upstream.update(extra)

        prompt = "".join(text + "\n" for text in texts)
        limit = max_completion_tokens if max_completion_tokens is not None else max_tokens
        call = OpenAIChatCall(
            UpstreamRequest(url=self._url, headers=self._headers, body=json_body(upstream)),
            CallInfo(
                model=model,
                stream=stream,
                metadata={"stream": stream},
                max_tokens=limit,
                dropped_fields=dropped_fields(raw_data, REQUEST_FIELDS, kept=data),
            ),
            FlagInput(model=model, prompt=prompt, max_tokens=limit or 0, uses_tokenizer=False),
            prompt_chars=sum(len(t) for t in texts),
            prompt_text=prompt,
        )
        call.strip_usage = stream and not client_wants_usage
        return call
