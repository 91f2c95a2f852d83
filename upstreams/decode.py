"""Typed decoding of client JSON bodies: known fields only, wrong types are a 400.

Go's decoder (the reference) matches keys case-insensitively and ignores
unknown ones; ``known_fields`` does the same so clients written for it work.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import orjson

from errors import BadRequest

_PREFIX = "failed to parse request body: "
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def parse_body(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest(_PREFIX + "empty body")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(_PREFIX + f"invalid JSON: {exc.msg} at position {exc.pos}") from exc
    if not isinstance(data, dict):
        raise BadRequest(_PREFIX + "the body must be a JSON object")
    return data


@lru_cache(maxsize=64)
def _lowered(names: tuple[str, ...]) -> dict[str, str]:
    return {n.lower(): n for n in names}


def known_fields(data: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Keep only ``names``, matching keys case-insensitively (exact spelling wins)."""
    lowered = _lowered(names)
    out: dict[str, Any] = {}
    for key, value in data.items():
        canonical = lowered.get(key.lower())
        if canonical is not None and (key == canonical or canonical not in out):
            out[canonical] = value
    return out


def _fail(path: str, expected: str, value: Any) -> BadRequest:
    return BadRequest(_PREFIX + f"field {path!r} must be {expected}, not {type(value).__name__}")


def opt_str(data: Mapping[str, Any], key: str, path: str | None = None) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(path or key, "a string", value)
    return value


def opt_int(data: Mapping[str, Any], key: str, path: str | None = None) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise _fail(path or key, "an integer", value)
    number = int(value)
    if not _INT64_MIN <= number <= _INT64_MAX:
        # 1e300 is integer-valued, but no upstream takes it and it cannot be re-encoded (a 500).
        raise BadRequest(_PREFIX + f"field {path or key!r} is out of range")
    return number


def opt_number(data: Mapping[str, Any], key: str, path: str | None = None) -> float | int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path or key, "a number", value)
    return value


def opt_bool(data: Mapping[str, Any], key: str, path: str | None = None) -> bool | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _fail(path or key, "a boolean", value)
    return value


def opt_str_list(data: Mapping[str, Any], key: str, path: str | None = None) -> list[str] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path or key, "a list of strings", value)
    return value


def opt_list(data: Mapping[str, Any], key: str, path: str | None = None) -> list[Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _fail(path or key, "a list", value)
    return value


def opt_object(data: Mapping[str, Any], key: str, path: str | None = None) -> dict[str, Any] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(path or key, "an object", value)
    return value


def require_object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, "an object", value)
    return value


# Passed-through JSON (tool schemas, tool inputs, nested blocks) is re-encoded
# by orjson, which refuses more than 254 levels: deeper is a 400 here, never
# a 500 there. Real requests nest a few levels (a JSON schema a dozen).
MAX_DEPTH = 64
# Names reported for the unknown-fields metric, and their length.
_MAX_DROPPED_NAMES = 16
_MAX_DROPPED_NAME_CHARS = 64


def check_nesting(value: Any, path: str, max_depth: int = MAX_DEPTH) -> None:
    """A 400 naming ``path`` if ``value`` nests deeper than ``max_depth`` levels."""
    if not isinstance(value, (dict, list)):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise BadRequest(_PREFIX + f"field {path!r} nests deeper than {max_depth} levels")
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def dropped_fields(data: Mapping[str, Any], names: tuple[str, ...], kept: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The top-level keys ``known_fields`` drops (bounded, for the unknown-fields metric).

    ``kept``, what ``known_fields`` returned for ``data``: when it is as long as
    ``data``, nothing was dropped and the keys are not looked at (the usual case).
    """
    if kept is not None and len(kept) >= len(data):
        return ()
    lowered = _lowered(names)
    dropped = [key[:_MAX_DROPPED_NAME_CHARS] for key in data if key.lower() not in lowered]
    return tuple(dropped[:_MAX_DROPPED_NAMES])


# Tool definitions in one request at most.
MAX_TOOLS = 2_000
_KINDS: dict[type, str] = {list: "a list", dict: "an object", str: "a string", bool: "a boolean", int: "an integer"}


def passthrough(data: Mapping[str, Any], fields: Mapping[str, type]) -> dict[str, Any]:
    """The fields of ``fields`` present in ``data``, type- and nesting-checked."""
    out: dict[str, Any] = {}
    if not any(key in fields for key in data):
        return out
    for key, expected in fields.items():
        value = data.get(key)
        if value is None:
            continue
        wrong = expected is not object and (
            not isinstance(value, expected) or (expected is int and isinstance(value, bool))
        )
        if wrong:
            raise BadRequest(
                f"failed to parse request body: field {key!r} must be {_KINDS[expected]}, not {type(value).__name__}"
            )
        check_nesting(value, key)
        out[key] = value
    tools = out.get("tools")
    if tools is not None:
        if len(tools) > MAX_TOOLS:
            raise BadRequest(f"failed to parse request body: field 'tools' has more than {MAX_TOOLS} tools")
        for i, tool in enumerate(tools):
            require_object(tool, f"tools[{i}]")
    return out

