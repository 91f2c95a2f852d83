"""Flagged prompts, listed under the diagnostics secret.

Screening (abuse/screening.py) records the prompts; these routes replace the
reference's SAMS-guarded /maintenance routes (SPEC point 10):

    GET /-/flagged-requests          {"prompts": [{"key", "traceId", "feature", "userId"}, ...]}
    GET /-/flagged-requests/<key>    the prompt as text/plain; <key> URL-escaped
"""

from __future__ import annotations

import logging
from typing import Any

from abuse.prompt_store import PromptStore, split_key
from errors import BadRequest, NotFound
from handlers.diagnostics import DiagnosticsHandler

log = logging.getLogger("gateway.flagging")


class FlaggedPromptsHandler(DiagnosticsHandler):
    """GET /-/flagged-requests"""

    def initialize(self, services: Any, store: PromptStore, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(services, **kwargs)
        self.store = store

    async def get(self) -> None:
        prompts = []
        for key in await self.store.keys():
            entry = split_key(key)
            if entry is None:
                log.warning("ignoring a malformed flagged prompt key %r", key)
                continue
            prompts.append(entry)
        self.write_json(200, {"prompts": prompts})


class FlaggedPromptHandler(DiagnosticsHandler):
    """GET /-/flagged-requests/<key> (Tornado has already URL-unescaped the key)."""

    def initialize(self, services: Any, store: PromptStore, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(services, **kwargs)
        self.store = store

    async def get(self, key: str) -> None:
        if not key.startswith("prompt:"):
            raise BadRequest("Invalid prompt key")
        prompt = await self.store.get(key)
        if prompt is None:
            raise NotFound("Prompt not found")
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(prompt.encode("utf-8", "surrogatepass"))
