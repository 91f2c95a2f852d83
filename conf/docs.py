"""Render the configuration reference (README) from conf/schema.json: one source of truth.

    python -m conf.docs            print the Markdown table
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from conf.loader import _leaves, env_names, load_schema


def _default(leaf: Mapping[str, Any]) -> str:
    if "default" not in leaf:
        return ""
    value = leaf["default"]
    if isinstance(value, (list, dict)) and len(value) > 3:
        return f"{len(value)} entries (see schema)"
    if isinstance(value, dict):
        return "`" + json.dumps(value) + "`"
    if value == "":
        return '`""`'
    return "`" + json.dumps(value) + "`"


def render_table() -> str:
    rows = ["| key | default | environment | meaning |", "|---|---|---|---|"]
    for path, leaf in _leaves(load_schema()):
        envs = ", ".join(f"`{n}`" for n in env_names(path, leaf))
        meaning = leaf.get("description", "")
        if "enum" in leaf:
            meaning = (meaning + "; " if meaning else "") + "one of " + ", ".join(f"`{v}`" for v in leaf["enum"])
        if leaf.get("x-secret"):
            meaning = (meaning + " " if meaning else "") + "(secret: never logged)"
        rows.append(f"| `{'.'.join(path)}` | {_default(leaf)} | {envs} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(render_table())
