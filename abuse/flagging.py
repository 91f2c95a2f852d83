"""Abuse heuristics (reference 4.7): is a completion request flagged, and is it blocked?

Pure functions of the request's ``FlagInput``, its prompt token count and the
``FlaggingConfig``; the pipeline hook that acts on the result (events,
prompt recording, the 400) lives in handlers/flagged_prompts.py.

Deliberate fixes:
- a request blocked by a token limit is reported with the reason of that
  limit (``high_prompt_token_count`` / ``high_max_tokens_to_sample``), and
  ``blocked_phrase`` only when a phrase matched (the reference added
  ``blocked_phrase`` to every block);
- flagged model names match case-insensitively, like allowlists;
- the prompt prefix is cut at 250 bytes without splitting a character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conf.model import FlaggingConfig
from upstreams.base import FlagInput

REASON_MODEL = "model_used"
REASON_UNKNOWN_PROMPT = "unknown_prompt"
REASON_MAX_TOKENS = "high_max_tokens_to_sample"
REASON_PROMPT_TOKENS = "high_prompt_token_count"
REASON_BLOCKED_PHRASE = "blocked_phrase"

PROMPT_PREFIX_BYTES = 250
PHRASE_PREFIX_CHARS = 5

BLOCKED_MESSAGE = (
    "We blocked your request because we detected your prompt to be against our Acceptable Use Policy "
    "(https://sourcegraph.com/terms/aup). Try again by removing any phrases that may violate our AUP. "
    "If you think this is a mistake, please contact support@sourcegraph.com and reference this ID: {trace_id}"
)


class InvalidFlaggingConfig(ValueError):
    pass


def validate(config: FlaggingConfig) -> None:
    if config.max_tokens_to_sample_flagging_limit == 0 or config.response_token_blocking_limit == 0:
        raise InvalidFlaggingConfig(
            "flagging config is invalid: max_tokens_to_sample_flagging_limit and "
            "response_token_blocking_limit must be non-zero"
        )


@dataclass(frozen=True, slots=True)
class FlaggingResult:
    reasons: tuple[str, ...]
    max_tokens: int
    prompt_prefix: str
    prompt_token_count: int | None
    should_block: bool
    blocked_phrase: str | None = None

    def event_metadata(self, *, dotcom: bool) -> dict[str, Any]:
        """``flagged`` and ``flagging_result`` as the reference's events carry them."""
        result: dict[str, Any] = {"reason": list(self.reasons), "should_block": self.should_block}
        if self.blocked_phrase is not None:
            result["blocked_phrase"] = self.blocked_phrase[:PHRASE_PREFIX_CHARS]
        if dotcom:
            # Prompt text goes into events only for Sourcegraph's own users.
            result["prompt_prefix"] = self.prompt_prefix
        return {"flagged": True, "flagging_result": result}


def prompt_prefix(prompt: str) -> str:
    return prompt.encode("utf-8", "surrogatepass")[:PROMPT_PREFIX_BYTES].decode("utf-8", "ignore")


def check(flag: FlagInput, token_count: int | None, config: FlaggingConfig) -> FlaggingResult | None:
    """The flagging result, or None when nothing is wrong with the request.

    ``token_count`` is the prompt's tokenizer count, None for providers the
    reference does not tokenize (their token limits are not checked).
    Raises InvalidFlaggingConfig for a config that cannot judge anything.
    """
    validate(config)
    lowered = flag.prompt.lower()
    reasons: list[str] = []
    if flag.model and flag.model.lower() in config.flagged_model_names:
        reasons.append(REASON_MODEL)
    if config.allowed_prompt_patterns and not any(p in lowered for p in config.allowed_prompt_patterns):
        reasons.append(REASON_UNKNOWN_PROMPT)
    if flag.max_tokens > config.max_tokens_to_sample_flagging_limit:
        reasons.append(REASON_MAX_TOKENS)
    if token_count is not None and token_count > config.prompt_token_flagging_limit:
        reasons.append(REASON_PROMPT_TOKENS)

    phrase = next((p for p in config.blocked_prompt_patterns if p and p in lowered), None)
    too_many_prompt_tokens = token_count is not None and token_count > config.prompt_token_blocking_limit
    too_many_max_tokens = flag.max_tokens > config.response_token_blocking_limit
    for blocked, reason in (
        (too_many_prompt_tokens, REASON_PROMPT_TOKENS),
        (too_many_max_tokens, REASON_MAX_TOKENS),
        (phrase is not None, REASON_BLOCKED_PHRASE),
    ):
        if blocked and reason not in reasons:
            reasons.append(reason)
    if not reasons:
        return None
    blocked = too_many_prompt_tokens or too_many_max_tokens or phrase is not None
    return FlaggingResult(
        reasons=tuple(reasons),
        max_tokens=flag.max_tokens,
        prompt_prefix=prompt_prefix(flag.prompt),
        prompt_token_count=token_count,
        should_block=blocked and config.request_blocking_enabled,
        blocked_phrase=phrase,
    )
