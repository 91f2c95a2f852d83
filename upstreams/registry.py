"""Which completion routes exist, given which providers have credentials.

A provider without an access token is disabled: its routes are not
registered (they answer 404) and that is logged once at start.

    /v1/completions/anthropic            Anthropic text completions (legacy)   ANTHROPIC_ACCESS_TOKEN
    /v1/completions/anthropic-messages   Anthropic Messages                    ANTHROPIC_ACCESS_TOKEN
    /anthropic/v1/messages               same, for the Anthropic SDK           ANTHROPIC_ACCESS_TOKEN
    /v1/completions/openai               OpenAI chat completions               OPENAI_ACCESS_TOKEN
    /openai/v1/chat/completions          same, for the OpenAI SDK              OPENAI_ACCESS_TOKEN
    /v1/completions/fireworks            Fireworks (chat or text by feature)   FIREWORKS_ACCESS_TOKEN
    /v1/completions/google               Google Gemini                         GOOGLE_ACCESS_TOKEN
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from conf.model import Config
from upstreams.anthropic_legacy import AnthropicLegacyProvider
from upstreams.anthropic_messages import AnthropicMessagesProvider
from upstreams.base import Provider
from upstreams.fireworks import FireworksProvider
from upstreams.google import GoogleProvider
from upstreams.openai_chat import OpenAIChatProvider

log = logging.getLogger("gateway")


@dataclass(frozen=True, slots=True)
class CompletionRoute:
    path: str
    provider: Provider
    # SDK-compatible twin: feature header optional (defaults to chat), x-api-key accepted.
    sdk_route: bool = False


# The paths each provider serves, for the 404 that names a disabled provider.
PROVIDER_PATHS: dict[str, tuple[str, ...]] = {
    "anthropic": ("/v1/completions/anthropic", "/v1/completions/anthropic-messages", "/anthropic/v1/messages"),
    "openai": ("/v1/completions/openai", "/openai/v1/chat/completions"),
    "fireworks": ("/v1/completions/fireworks",),
    "google": ("/v1/completions/google",),
}


def enabling_variable(provider: str) -> str:
    return f"CODY_GATEWAY_{provider.upper()}_ACCESS_TOKEN"


def _disabled(provider: str) -> None:
    log.warning("provider %s is disabled: no access token (%s)", provider, enabling_variable(provider))


def disabled_routes(config: Config) -> list[tuple[str, str]]:
    """(path, message) for every completion path whose provider has no access token."""
    providers = config.providers
    out: list[tuple[str, str]] = []
    for name, paths in PROVIDER_PATHS.items():
        if getattr(providers, name).access_token:
            continue
        message = f"provider {name} is disabled on this gateway: set {enabling_variable(name)} to enable it"
        out += [(path, message) for path in paths]
    return out


def completion_routes(config: Config) -> list[CompletionRoute]:
    providers = config.providers
    max_messages = config.server.max_messages
    routes: list[CompletionRoute] = []

    anthropic = providers.anthropic
    if anthropic.access_token:
        messages = AnthropicMessagesProvider(anthropic, max_messages=max_messages)
        routes += [
            CompletionRoute("/v1/completions/anthropic", AnthropicLegacyProvider(anthropic)),
            CompletionRoute("/v1/completions/anthropic-messages", messages),
            CompletionRoute("/anthropic/v1/messages", messages, sdk_route=True),
        ]
    else:
        _disabled("anthropic")

    openai = providers.openai
    if openai.access_token:
        chat = OpenAIChatProvider(openai, max_messages=max_messages)
        routes += [
            CompletionRoute("/v1/completions/openai", chat),
            CompletionRoute("/openai/v1/chat/completions", chat, sdk_route=True),
        ]
    else:
        _disabled("openai")

    if providers.fireworks.access_token:
        routes.append(CompletionRoute("/v1/completions/fireworks", FireworksProvider(providers.fireworks, max_messages=max_messages)))
    else:
        _disabled("fireworks")

    if providers.google.access_token:
        routes.append(CompletionRoute("/v1/completions/google", GoogleProvider(providers.google, max_messages=max_messages)))
    else:
        _disabled("google")
    return routes
