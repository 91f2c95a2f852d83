"""Flagged prompts: the pipeline's screening hook and their listing under the diagnostics secret.

The hook (``services.extras["screen_request"]``) runs once per completions
request, after the allowlist check: it judges the request with
upstreams/flagging.py, records flagged prompts of Sourcegraph's own users
(never code completions), emits ``RequestBlocked`` and answers 400 when the
request is blocked, and otherwise returns what the ``CompletionsFinished``
event should carry (``flagged``, ``flagging_result``, ``full_prompt``).

The listing replaces the reference's SAMS-guarded /maintenance routes
(SPEC point 10):

    GET /-/flagged-requests          {"prompts": [{"key", "traceId", "feature", "userId"}, ...]}
    GET /-/flagged-requests/<key>    the prompt as text/plain; <key> URL-escaped
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from actors.model import CODE_COMPLETIONS
from conf.model import Config
from errors import BadRequest, NotFound
from handlers.diagnostics import DiagnosticsHandler
from usage import events as ev
from upstreams import flagging
from upstreams.base import ProviderCall
from upstreams.prompt_store import (
    MemoryPromptStore,
    PromptStore,
    RedisPromptStore,
    prompt_key,
    split_key,
)
from upstreams.tokenizer import count_tokens

log = logging.getLogger("gateway.flagging")

# Prompts longer than this are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 64 * 1024


def make_prompt_store(redis_client: Any | None) -> PromptStore:
    return RedisPromptStore(redis_client) if redis_client is not None else MemoryPromptStore()


class ScreenRequest:
    """The ``screen_request`` hook; ``store`` is shared with the listing routes."""

    def __init__(self, config: Config, store: PromptStore) -> None:
        self._config = config.flagging
        self._log_prompts_for = frozenset(config.actors.identifiers_to_log_for)
        self.store = store
        self._tasks: set[asyncio.Task[None]] = set()
        try:
            flagging.validate(config.flagging)
            self._enabled = True
        except flagging.InvalidFlaggingConfig as exc:
            # Said once at start rather than on every request.
            log.error("%s; requests are not flagged", exc)
            self._enabled = False

    async def __call__(self, handler: Any, call: ProviderCall) -> dict[str, Any]:
        flag = call.flag_input()
        actor = handler.actor
        if flag is None or actor is None:
            return {}
        dotcom = actor.is_dotcom()
        metadata: dict[str, Any] = {}
        if dotcom and actor.id in self._log_prompts_for:
            metadata["full_prompt"] = flag.prompt
        if not self._enabled:
            return metadata
        token_count = await self._token_count(call) if flag.uses_tokenizer else None
        result = flagging.check(flag, token_count, self._config)
        if result is None:
            return metadata
        feature = handler.feature or ""
        if dotcom and feature != CODE_COMPLETIONS:
            self._record_prompt(handler.trace_id, feature, actor.id, flag.prompt)
        flag_metadata = result.event_metadata(dotcom=dotcom)
        if result.should_block:
            provider = handler.provider.name
            headers = handler.request.headers
            handler.record_event(
                ev.Event(
                    ev.REQUEST_BLOCKED,
                    actor.source,
                    actor.id,
                    {
                        **flag_metadata,
                        "feature": feature,
                        "model": f"{provider}/{flag.model}",
                        "provider": provider,
                        "prompt_token_count": result.prompt_token_count,
                        "max_tokens_to_sample": result.max_tokens,
                        "sg_actor_id": headers.get("X-Sourcegraph-Actor-UID", ""),
                        "sg_actor_anonymous_uid": headers.get("X-Sourcegraph-Actor-Anonymous-UID", ""),
                    },
                )
            )
            log.info("request blocked: %s", ", ".join(result.reasons))
            raise BadRequest(flagging.BLOCKED_MESSAGE.format(trace_id=handler.trace_id))
        log.info("request flagged, not blocked: %s", ", ".join(result.reasons))
        metadata.update(flag_metadata)
        return metadata

    async def _token_count(self, call: ProviderCall) -> int:
        usage = call.usage()
        if usage.prompt_tokenizer_tokens is not None:
            return usage.prompt_tokenizer_tokens
        flag = call.flag_input()
        assert flag is not None
        if len(flag.prompt) > _INLINE_TOKENIZE_CHARS:
            count = await asyncio.get_running_loop().run_in_executor(None, count_tokens, flag.prompt)
        else:
            count = count_tokens(flag.prompt)
        setter = getattr(call, "set_prompt_tokenizer_tokens", None)
        if setter is not None:
            setter(count)
        return count

    def _record_prompt(self, trace_id: str, feature: str, actor_id: str, prompt: str) -> None:
        ttl = self._config.flagged_prompt_recorder_ttl
        if ttl <= 0:
            return
        if not (trace_id and feature and actor_id):
            log.warning("flagged prompt not recorded: trace id, feature and actor id are all needed")
            return
        task = asyncio.ensure_future(self.store.record(prompt_key(trace_id, feature, actor_id), prompt, ttl))
        self._tasks.add(task)
        task.add_done_callback(self._recorded)

    def _recorded(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("failed to record a flagged prompt: %s", task.exception())


def make_screen_request(config: Config, redis_client: Any | None) -> ScreenRequest:
    """The hook for ``services.extras["screen_request"]``; its ``store`` feeds the listing."""
    return ScreenRequest(config, make_prompt_store(redis_client))


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


def flagged_prompt_routes(store: PromptStore) -> list[tuple[str, type, dict[str, Any]]]:
    """Extra routes for make_app (they must come before the /-/ catch-all)."""
    return [
        (r"/-/flagged-requests", FlaggedPromptsHandler, {"store": store}),
        (r"/-/flagged-requests/(.+)", FlaggedPromptHandler, {"store": store}),
    ]
