"""The providers, by name, built once from the config.

A provider without an access token is disabled: it is not built, and that
is logged once at start. The route table (composition.py) maps paths to
these names; nothing here knows a path.

    anthropic            Anthropic text completions (legacy)   CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN
    anthropic-messages   Anthropic Messages                    CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN
    openai               OpenAI chat completions               CODY_GATEWAY_OPENAI_ACCESS_TOKEN
    fireworks            Fireworks (chat or text by feature)   CODY_GATEWAY_FIREWORKS_ACCESS_TOKEN
    google               Google Gemini                         CODY_GATEWAY_GOOGLE_ACCESS_TOKEN
"""

from __future__ import annotations

import logging

from conf.model import Config
from upstreams.anthropic_legacy import AnthropicLegacyProvider
from upstreams.anthropic_messages import AnthropicMessagesProvider
from upstreams.base import Provider
from upstreams.fireworks import FireworksProvider
from upstreams.google import GoogleProvider
from upstreams.openai_chat import OpenAIChatProvider

log = logging.getLogger("gateway")

# Provider name -> the configured provider (providers.<name>) whose access token enables it.
CONFIGURED_AS = {
    "anthropic": "anthropic",
    "anthropic-messages": "anthropic",
    "openai": "openai",
    "fireworks": "fireworks",
    "google": "google",
}


def enabling_variable(configured: str) -> str:
    return f"CODY_GATEWAY_{configured.upper()}_ACCESS_TOKEN"


def disabled_message(name: str) -> str:
    """What a route of a disabled provider answers (with 404)."""
    configured = CONFIGURED_AS[name]
    return f"provider {configured} is disabled on this gateway: set {enabling_variable(configured)} to enable it"


def build_providers(config: Config) -> dict[str, Provider]:
    """Every enabled provider by name; one object per provider, shared by its routes."""
    providers = config.providers
    max_messages = config.server.max_messages
    built: dict[str, Provider] = {}
    if providers.anthropic.access_token:
        built["anthropic"] = AnthropicLegacyProvider(providers.anthropic)
        built["anthropic-messages"] = AnthropicMessagesProvider(providers.anthropic, max_messages=max_messages)
    if providers.openai.access_token:
        built["openai"] = OpenAIChatProvider(providers.openai, max_messages=max_messages)
    if providers.fireworks.access_token:
        built["fireworks"] = FireworksProvider(providers.fireworks, max_messages=max_messages)
    if providers.google.access_token:
        built["google"] = GoogleProvider(providers.google, max_messages=max_messages)
    for configured in ("anthropic", "openai", "fireworks", "google"):
        if not getattr(providers, configured).access_token:
            log.warning("provider %s is disabled: no access token (%s)", configured, enabling_variable(configured))
    return built
