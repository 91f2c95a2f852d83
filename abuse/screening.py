"""Abuse screening of completion requests (reference 4.7): a verdict, never a side door.

``Screening.screen`` runs once per completions request, after the allowlist
check. It judges the request with abuse/flagging.py and records flagged
prompts of Sourcegraph's own users (never code completions) in the prompt
store; it returns a ``Verdict``: what the ``CompletionsFinished`` event
should carry (``flagged``, ``flagging_result``, ``full_prompt``), or, for a
blocked request, the ``RequestBlocked`` event and the 400 to answer. The
pipeline records and raises; screening never touches the request itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from abuse import flagging
from abuse.prompt_store import (
    MemoryPromptStore,
    PromptStore,
    RedisPromptStore,
    prompt_key,
)
from actors.model import CODE_COMPLETIONS, Actor
from background import BackgroundTasks
from conf.model import Config
from errors import BadRequest
from upstreams.base import ProviderCall
from upstreams.tokenizer import count_tokens
from usage import events as ev

log = logging.getLogger("gateway.flagging")

# Prompts longer than this are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 64 * 1024


@dataclass(slots=True)
class Verdict:
    """``metadata`` goes into the CompletionsFinished event; a blocked request has
    ``blocked`` (the RequestBlocked event) and ``error`` (the answer) instead."""

    metadata: dict[str, Any] = field(default_factory=dict)
    blocked: ev.Event | None = None
    error: BadRequest | None = None


@dataclass(frozen=True, slots=True)
class Subject:
    """Who sent the request being screened, and under which trace."""

    actor: Actor
    feature: str
    provider: str
    trace_id: str
    actor_uid: str
    anonymous_uid: str


def make_prompt_store(redis_client: Any | None) -> PromptStore:
    return RedisPromptStore(redis_client) if redis_client is not None else MemoryPromptStore()


class Screening:
    """Built once at start; ``store`` is shared with the flagged-prompt listing routes."""

    def __init__(self, config: Config, store: PromptStore) -> None:
        self._config = config.flagging
        self._log_prompts_for = frozenset(config.actors.identifiers_to_log_for)
        self.store = store
        self._tasks = BackgroundTasks(log)
        try:
            flagging.validate(config.flagging)
            self._enabled = True
        except flagging.InvalidFlaggingConfig as exc:
            # Said once at start rather than on every request.
            log.error("%s; requests are not flagged", exc)
            self._enabled = False

    async def screen(self, subject: Subject, call: ProviderCall) -> Verdict:
        flag = call.flag_input()
        verdict = Verdict()
        if flag is None:
            return verdict
        actor = subject.actor
        dotcom = actor.is_dotcom()
        if dotcom and actor.id in self._log_prompts_for:
            verdict.metadata["full_prompt"] = flag.prompt
        if not self._enabled:
            return verdict
        token_count = await self._token_count(call) if flag.uses_tokenizer else None
        result = flagging.check(flag, token_count, self._config)
        if result is None:
            return verdict
        feature = subject.feature
        if dotcom and feature != CODE_COMPLETIONS:
            self._record_prompt(subject.trace_id, feature, actor.id, flag.prompt)
        flag_metadata = result.event_metadata(dotcom=dotcom)
        if result.should_block:
            provider = subject.provider
            verdict.blocked = ev.Event(
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
                    "sg_actor_id": subject.actor_uid,
                    "sg_actor_anonymous_uid": subject.anonymous_uid,
                },
            )
            verdict.error = BadRequest(flagging.BLOCKED_MESSAGE.format(trace_id=subject.trace_id))
            log.info("request blocked: %s", ", ".join(result.reasons))
            return verdict
        log.info("request flagged, not blocked: %s", ", ".join(result.reasons))
        verdict.metadata.update(flag_metadata)
        return verdict

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
        self._tasks.spawn(self.store.record(prompt_key(trace_id, feature, actor_id), prompt, ttl), "recording a flagged prompt")


def make_screening(config: Config, redis_client: Any | None) -> Screening:
    return Screening(config, make_prompt_store(redis_client))
