"""Configuration: schema validation, environment overrides, the README's generated table."""

from __future__ import annotations

from pathlib import Path

import pytest

from conf.loader import ConfigError, load_config
from conf.readme import README, rendered


def test_defaults_load_without_any_environment() -> None:
    config = load_config(environ={})
    assert config.port == 9992 and config.redis.endpoint == ""
    assert config.events.resolved_sink == "jsonl"
    assert config.actors.concurrency_limit_interval == 10.0


def test_reference_environment_names_are_honoured() -> None:
    config = load_config(
        environ={
            "PORT": "8080",
            "REDIS_ENDPOINT": "redis://127.0.0.1:6379/0",
            "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": "k",
            "CODY_GATEWAY_ANTHROPIC_ALLOWED_MODELS": "claude-2, claude-3-haiku-20240307",
            "CODY_GATEWAY_SOURCES_SYNC_INTERVAL": "5m",
            "CODY_GATEWAY_ALLOW_ANONYMOUS": "true",
            "GOOGLE_CLOUD_PROJECT": "proj",
        }
    )
    assert config.port == 8080
    assert config.redis.endpoint.startswith("redis://")
    assert config.providers.anthropic.allowed_models == ("claude-2", "claude-3-haiku-20240307")
    assert config.actors.sources_sync_interval == 300.0
    assert config.actors.allow_anonymous is True
    assert config.events.resolved_sink == "bigquery"


def test_generic_environment_names_and_overrides_win() -> None:
    config = load_config(
        environ={"CODY_GATEWAY_UPSTREAM_MAX_CLIENTS": "77", "PORT": "1"}, overrides={"port": 2}
    )
    assert config.upstream.max_clients == 77 and config.port == 2


def test_every_bad_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('typo = 1\n[events]\nsink = "kafka"\n[actors]\nlocal_cache_ttl = "soon"\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad, environ={"CODY_GATEWAY_SERVER_MAX_BODY_BYTES": "lots"})
    text = str(info.value)
    for key in ("typo", "events.sink", "actors.local_cache_ttl", "server.max_body_bytes"):
        assert key in text, text


def test_enabled_provider_needs_models() -> None:
    with pytest.raises(ConfigError, match=r"providers\.openai\.allowed_models"):
        load_config(environ={"CODY_GATEWAY_OPENAI_ACCESS_TOKEN": "k", "CODY_GATEWAY_OPENAI_ALLOWED_MODELS": "[]"})


def test_readme_config_table_matches_schema() -> None:
    text = README.read_text()
    assert rendered(text) == text, "README config table is stale: run `python -m conf.readme`"
