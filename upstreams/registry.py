"""Which completion routes exist, given which providers have credentials.

A provider without an access token is disabled: its routes are not
registered (they answer 404) and that is logged once at start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from conf.model import Config
from upstreams.anthropic_messages import AnthropicMessagesProvider
from upstreams.base import Provider

log = logging.getLogger("gateway")


@dataclass(frozen=True, slots=True)
class CompletionRoute:
    path: str
    provider: Provider
    # SDK-compatible twin: feature header optional (defaults to chat), x-api-key accepted.
    sdk_route: bool = False


def completion_routes(config: Config) -> list[CompletionRoute]:
    routes: list[CompletionRoute] = []
    anthropic = config.providers.anthropic
    if anthropic.access_token:
        messages = AnthropicMessagesProvider(anthropic, max_messages=config.server.max_messages)
        routes += [
            CompletionRoute("/v1/completions/anthropic-messages", messages),
            CompletionRoute("/anthropic/v1/messages", messages, sdk_route=True),
        ]
    else:
        log.warning("provider anthropic is disabled: no access token (CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN)")
    return routes
