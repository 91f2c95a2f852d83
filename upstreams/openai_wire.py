"""OpenAI's chat completions wire format, shared by the providers that speak it (OpenAI, Fireworks).

Messages and their content parts, and the call that reads usage from
``chat.completion`` bodies and ``chat.completion.chunk`` streams. Provider
modules stay ignorant of one another; what they share is this format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from errors import BadRequest
from upstreams.buffered_call import BufferedCall
from upstreams.decode import check_nesting, opt_str, require_object

# Content parts in one message at most.
MAX_PARTS = 10_000


def message_content(value: Any, path: str) -> tuple[Any, str]:
    """(what to forward, its text) for a message's content."""
    if value is None:
        return "", ""
    if isinstance(value, str):
        return value, value
    if not isinstance(value, list):
        raise BadRequest(f"failed to parse request body: field {path!r} must be a string or a list of parts")
    if len(value) > MAX_PARTS:
        raise BadRequest(f"failed to parse request body: field {path!r} has more than {MAX_PARTS} parts")
    parts: list[dict[str, Any]] = []
    texts: list[str] = []
    for i, raw in enumerate(value):
        where = f"{path}[{i}]"
        part = require_object(raw, where)
        kind = opt_str(part, "type", f"{where}.type") or "text"
        if kind == "text":
            text = opt_str(part, "text", f"{where}.text") or ""
            out: dict[str, Any] = {"type": "text", "text": text}
            for key, extra in part.items():
                if key not in ("type", "text"):
                    out[key] = extra
            if len(out) > 2:
                check_nesting(out, where)
            parts.append(out)
            texts.append(text)
            continue
        if len(kind) > 64:
            raise BadRequest(f"failed to parse request body: field '{where}.type' is too long")
        check_nesting(part, where)
        parts.append(part)
    return parts, "".join(texts)


def message_extras(msg: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``tool_calls`` (assistant) and ``tool_call_id`` (tool), checked, to forward."""
    out: dict[str, Any] = {}
    if "tool_calls" not in msg and "tool_call_id" not in msg:
        return out
    tool_calls = msg.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise BadRequest(f"failed to parse request body: field '{path}.tool_calls' must be a list")
        for i, call in enumerate(tool_calls):
            require_object(call, f"{path}.tool_calls[{i}]")
        check_nesting(tool_calls, f"{path}.tool_calls")
        out["tool_calls"] = tool_calls
    tool_call_id = opt_str(msg, "tool_call_id", f"{path}.tool_call_id")
    if tool_call_id is not None:
        out["tool_call_id"] = tool_call_id
    return out


def is_final_usage_event(event: Mapping[str, Any]) -> bool:
    """A stream chunk whose usage is final: the usage-only chunk (no choices) or a
    chunk that finishes a choice. Usage on any other chunk is a running count."""
    choices = event.get("choices")
    if not choices:
        return True
    if isinstance(choices, list):
        return any(isinstance(c, dict) and c.get("finish_reason") for c in choices)
    return False


class OpenAIStyleCall(BufferedCall):
    """OpenAI-shaped streams and bodies (OpenAI and Fireworks chat)."""

    def _on_event(self, name: bytes, data: bytes) -> None:
        event = self._json(data)
        if event is None:
            return
        if self._took_error(event, "choices"):
            return
        self._read_choices(event.get("choices"), "delta")
        usage = event.get("usage")
        if isinstance(usage, dict):
            self._read_openai_usage(usage, final=is_final_usage_event(event))

    def _on_body(self, data: dict[str, Any]) -> None:
        self._read_choices(data.get("choices"), "message")
        if self._usage.completion_chars is None:
            self._usage.completion_chars = 0
        self._read_usage(data.get("usage"))

    def _read_choices(self, choices: Any, message_key: str) -> None:
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            text = choice.get("text")
            if isinstance(text, str):
                self._add_text(text)
            message = choice.get(message_key)
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                self._add_text(content)
            elif message_key == "message":
                self._add_text("")
            tool_calls = message.get("tool_calls")
            if isinstance(tool_calls, list):
                for call in tool_calls:
                    function = call.get("function") if isinstance(call, dict) else None
                    arguments = function.get("arguments") if isinstance(function, dict) else None
                    if isinstance(arguments, str):
                        self._add_text(arguments)

