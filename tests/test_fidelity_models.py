"""Current models, kept current (issue 15): the default allowlists against the model lists
of the SDKs pinned in requirements-dev.txt, glob allowlist entries, the list format of the
*_ALLOWED_MODELS variables."""

from __future__ import annotations

import datetime as dt
import re
import typing
from pathlib import Path

import anthropic
import openai
import pytest
from anthropic._data.deprecated_models import DEPRECATED_MODELS
from anthropic.types.model_param import ModelParam
from openai.types.shared.chat_model import ChatModel

from actors.limits import evaluate_allowed_models, glob_match, is_model_allowed
from conf.loader import ConfigError, load_config
from upstreams.anthropic_messages import AnthropicMessagesProvider, parse_betas

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements-dev.txt"
# The day the default allowlists were last compared with the pinned SDKs. Fixed, so the
# test does not start failing on its own when a shutdown date passes: an SDK upgrade
# (new ids, new deprecations) or moving this date flags a stale default.
TODAY = dt.date(2026, 12, 6)


def _literals(alias: object) -> list[str]:
    out: list[str] = []
    for arg in typing.get_args(alias):
        if isinstance(arg, str):
            out.append(arg)
        else:
            out += _literals(arg)
    return out


def _eol(text: str) -> dt.date:
    cleaned = re.sub(r"(\d+)(st|nd|rd|th)", r"\1", text)
    return dt.datetime.strptime(cleaned, "%B %d, %Y").date()


def _openai_shutdowns() -> dict[str, dt.date]:
    """Model -> announced shutdown date, from the SDK's ChatModel docstring (ids it calls
    "not a supported model ID" count as shut down)."""
    import openai.types.shared.chat_model as module

    source = Path(module.__file__).read_text()
    out: dict[str, dt.date] = {}
    for names, date in re.findall(r'^- ((?:"[^"]+",?\s*)+):\s*Announced\s+shutdown\s+date:\s*(\d{4}-\d{2}-\d{2})', source, re.MULTILINE):
        for name in re.findall(r'"([^"]+)"', names):
            out[name] = dt.date.fromisoformat(date)
    for names in re.findall(r'^- ((?:"[^"]+",?\s*)+):\s*Not\s+a\s+supported\s+model\s+ID', source, re.MULTILINE):
        for name in re.findall(r'"([^"]+)"', names):
            out[name] = dt.date.min
    return out


def test_pinned_sdks_are_the_installed_ones() -> None:
    pins = dict(line.split("==") for line in REQUIREMENTS.read_text().splitlines() if "==" in line and not line.startswith("#"))
    assert pins["anthropic"] == anthropic.__version__
    assert pins["openai"] == openai.__version__


def test_anthropic_defaults_cover_the_sdk_models() -> None:
    config = load_config(environ={})
    master = [f"anthropic/{m}" for m in config.providers.anthropic.allowed_models]
    live = [m for m in _literals(ModelParam) if m not in DEPRECATED_MODELS or _eol(DEPRECATED_MODELS[m]) > TODAY]
    missing = [m for m in live if not is_model_allowed(f"anthropic/{m}", master)]
    assert not missing, f"SDK {anthropic.__version__} lists models the default allowlist lacks: {missing}"
    # No default names a model the SDK says reached its end of life (the reference's ids excepted: they stay).
    retired = [m for m, eol in DEPRECATED_MODELS.items() if _eol(eol) <= TODAY and m in config.providers.anthropic.allowed_models]
    assert not retired, f"default allowlist names retired models: {retired}"


def test_openai_defaults_cover_the_sdk_models() -> None:
    config = load_config(environ={})
    master = [f"openai/{m}" for m in config.providers.openai.allowed_models]
    shutdown = _openai_shutdowns()
    assert shutdown, "could not read the SDK's deprecation notes"
    reference = {"gpt-4", "gpt-3.5-turbo", "gpt-4o", "gpt-4-turbo", "gpt-4-turbo-preview"}
    live = [m for m in _literals(ChatModel) if m not in shutdown or shutdown[m] > TODAY]
    missing = [m for m in live if not is_model_allowed(f"openai/{m}", master)]
    assert not missing, f"SDK {openai.__version__} lists models the default allowlist lacks: {missing}"
    retired = [m for m in config.providers.openai.allowed_models if m in shutdown and shutdown[m] <= TODAY and m not in reference]
    assert not retired, f"default allowlist names shut-down models: {retired}"


def test_reference_ids_stay_allowed() -> None:
    config = load_config(environ={})
    for model in ("claude-3-5-sonnet-20240620", "claude-instant-1.2", "claude-2.1"):
        assert model in config.providers.anthropic.allowed_models
    for model in ("gpt-4", "gpt-3.5-turbo", "gpt-4o", "gpt-4-turbo", "gpt-4-turbo-preview"):
        assert model in config.providers.openai.allowed_models
    assert "gemini-1.5-pro" in config.providers.google.allowed_models
    assert "starcoder" in config.providers.fireworks.allowed_models


@pytest.mark.parametrize(
    ("name", "pattern", "matches"),
    [
        ("anthropic/claude-sonnet-4-6", "anthropic/claude-sonnet-*", True),
        ("ANTHROPIC/Claude-Sonnet-4-6", "anthropic/claude-sonnet-*", True),
        ("anthropic/claude-opus-4-6", "anthropic/claude-sonnet-*", False),
        ("openai/gpt-5.5", "openai/gpt-5.?", True),
        ("openai/gpt-5.55", "openai/gpt-5.?", False),
        ("openai/gpt-4o", "openai/gpt-4o", True),
        ("openai/gpt-4o-mini", "openai/gpt-4o", False),
        ("fireworks/accounts/x/models/y", "fireworks/*", True),
        ("openai/gpt-4.1", "openai/gpt-4[.]1", False),  # only * and ? are special
    ],
)
def test_glob_match(name: str, pattern: str, matches: bool) -> None:
    assert glob_match(name, pattern) is matches


def test_allowlist_intersection_with_patterns() -> None:
    master = ["anthropic/claude-sonnet-*", "anthropic/claude-3-haiku-20240307", "anthropic/claude-opus-4-6"]
    assert evaluate_allowed_models(["*"], master) == master
    # An actor pattern wider than a master entry keeps the master entry; a narrower one keeps itself.
    assert evaluate_allowed_models(["anthropic/claude-*"], master) == master
    assert evaluate_allowed_models(["anthropic/claude-sonnet-4-*"], master) == ["anthropic/claude-sonnet-4-*"]
    assert evaluate_allowed_models(["anthropic/CLAUDE-OPUS-4-6", "anthropic/claude-2"], master) == ["anthropic/CLAUDE-OPUS-4-6"]
    allowed = evaluate_allowed_models(["anthropic/claude-sonnet-4-*"], master)
    assert is_model_allowed("anthropic/claude-sonnet-4-6", allowed)
    assert not is_model_allowed("anthropic/claude-sonnet-5", allowed)


def test_allowed_models_env_list_formats() -> None:
    default = load_config(environ={}).providers.openai.allowed_models
    replaced = load_config(environ={"CODY_GATEWAY_OPENAI_ALLOWED_MODELS": "gpt-5.5, gpt-5*"}).providers.openai.allowed_models
    assert replaced == ("gpt-5.5", "gpt-5*")
    as_json = load_config(environ={"CODY_GATEWAY_OPENAI_ALLOWED_MODELS": '["gpt-5.5"]'}).providers.openai.allowed_models
    assert as_json == ("gpt-5.5",)
    added = load_config(environ={"CODY_GATEWAY_OPENAI_ALLOWED_MODELS": "+my-fine-tune,gpt-4"}).providers.openai.allowed_models
    assert added == (*default, "my-fine-tune")  # one model added, the list not restated, no duplicate


def test_max_tokens_caps_and_betas_from_config() -> None:
    config = load_config(
        environ={
            "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": "k",
            "CODY_GATEWAY_ANTHROPIC_MAX_TOKENS_CAPS": '{"claude-sonnet-*": 1000}',
            "CODY_GATEWAY_ANTHROPIC_ALLOWED_BETAS": "a-beta",
        }
    )
    provider = AnthropicMessagesProvider(config.providers.anthropic, max_messages=10)
    assert provider.max_tokens_cap("claude-sonnet-4-6") == 1000
    assert provider.max_tokens_cap("claude-opus-4-6") == config.providers.anthropic.max_tokens_to_sample
    assert parse_betas("a-beta", frozenset({"a-beta"})) == ["a-beta"]
    assert parse_betas("x, y", frozenset({"*"})) == ["x", "y"]
    with pytest.raises(ConfigError):
        load_config(environ={"CODY_GATEWAY_ANTHROPIC_MAX_TOKENS_CAPS": '{"claude-*": 0}'})


def test_default_caps_follow_documented_output_limits() -> None:
    provider = AnthropicMessagesProvider(load_config(environ={"CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": "k"}).providers.anthropic, max_messages=10)
    expected = {
        "claude-3-haiku-20240307": 4096,
        "claude-3-5-sonnet-20240620": 8192,
        "claude-3-7-sonnet-20250219": 64000,
        "claude-sonnet-4-20250514": 64000,
        "claude-opus-4-1": 32000,
        "claude-haiku-4-5": 64000,
        "claude-sonnet-4-6": 64000,
        "claude-opus-4-6": 128000,
        "claude-sonnet-5-5": 128000,
        "claude-2.1": 4000,
    }
    assert {m: provider.max_tokens_cap(m) for m in expected} == expected
