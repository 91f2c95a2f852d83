"""Load the configuration once: TOML file, then environment, validated by conf/schema.json.

Every leaf of the schema can be set from the environment under
``CODY_GATEWAY_<PATH>`` (e.g. ``CODY_GATEWAY_UPSTREAM_MAX_CLIENTS``) and
under the reference's names listed in the leaf's ``x-env`` (``PORT``,
``REDIS_ENDPOINT``, ...). A bad configuration raises ConfigError naming
every bad key at once.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema

from conf.durations import parse_duration
from conf.model import (
    ActorsConfig,
    AnthropicConfig,
    Config,
    EmbeddingsConfig,
    EventsConfig,
    FireworksConfig,
    FlaggingConfig,
    GoogleConfig,
    OpenAIConfig,
    ProvidersConfig,
    RedisConfig,
    ServerConfig,
    SourcegraphEmbeddingsConfig,
    TelemetryConfig,
    UpstreamConfig,
)

CONF_DIR = Path(__file__).resolve().parent
REPO_DIR = CONF_DIR.parent
SCHEMA_PATH = CONF_DIR / "schema.json"
DEFAULT_CONFIG_PATH = CONF_DIR / "gateway.toml"
ENV_PREFIX = "CODY_GATEWAY_"
_INT64_MAX = 2**63 - 1


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


def load_schema() -> dict[str, Any]:
    with SCHEMA_PATH.open() as fh:
        schema: dict[str, Any] = json.load(fh)
    return schema


def _leaves(
    schema: Mapping[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Mapping[str, Any]]]:
    for key, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            yield from _leaves(sub, (*path, key))
        else:
            yield (*path, key), sub


def env_names(path: tuple[str, ...], leaf: Mapping[str, Any]) -> list[str]:
    names = [ENV_PREFIX + "_".join(path).upper(), *leaf.get("x-env", [])]
    return list(dict.fromkeys(names))


def secret_env_names(schema: Mapping[str, Any] | None = None) -> list[str]:
    """Environment names whose values must never be logged (used by tests and log scrubbing)."""
    schema = schema or load_schema()
    return [name for path, leaf in _leaves(schema) if leaf.get("x-secret") for name in env_names(path, leaf)]


def _parse_env_value(raw: str, leaf: Mapping[str, Any]) -> Any:
    kind = leaf.get("type")
    if kind == "integer":
        return int(raw.strip())
    if kind == "number":
        return float(raw.strip())
    if kind == "boolean":
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if kind == "array":
        stripped = raw.strip()
        if stripped.startswith("+"):
            # "+a,b" (or "+[...]"): added to the file's (or the default) list, not replacing it.
            return _Append(_parse_env_value(stripped[1:], leaf))
        if stripped.startswith("["):
            return json.loads(stripped)
        return [part.strip() for part in stripped.split(",") if part.strip()]
    if kind == "object":
        return json.loads(raw)
    return raw


class _Append(list[Any]):
    """Environment list values that extend the configured (or default) list."""


def _set_path(doc: dict[str, Any], path: tuple[str, ...], value: Any, default: Any = None) -> None:
    node = doc
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    if isinstance(value, _Append):
        base = node.get(path[-1], default)
        value = [*(base if isinstance(base, list) else []), *(v for v in value if v not in (base or []))]
    node[path[-1]] = value


def _fill_defaults(doc: dict[str, Any], schema: Mapping[str, Any]) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in doc and "default" in sub:
            doc[key] = json.loads(json.dumps(sub["default"]))
        if sub.get("type") == "object" and "properties" in sub and isinstance(doc.get(key), dict):
            _fill_defaults(doc[key], sub)


def _normalise_numbers(node: Any, schema: Mapping[str, Any], path: tuple[str, ...]) -> list[str]:
    """Reject NaN and infinities (TOML and float() accept them, every comparison with them is
    false, so no minimum would catch them) and turn integer-valued floats into ints where the
    schema wants an integer (jsonschema accepts 2048.0 as an integer; code downstream may not)."""
    problems: list[str] = []
    kind = schema.get("type")
    if isinstance(node, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in list(node.items()):
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            where = ".".join((*path, str(key)))
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _INT64_MAX:
                problems.append(f"{where}: out of range (more than 64 bits)")
            elif isinstance(value, float):
                if not math.isfinite(value):
                    problems.append(f"{where}: must be a finite number, not {value}")
                elif sub.get("type") == "integer" and value.is_integer():
                    node[key] = int(value)
            else:
                problems += _normalise_numbers(value, sub, (*path, str(key)))
    elif isinstance(node, list) and kind == "array":
        items = schema.get("items", {})
        for i, value in enumerate(node):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _INT64_MAX:
                problems.append(f"{'.'.join((*path, str(i)))}: out of range (more than 64 bits)")
            elif isinstance(value, float):
                if not math.isfinite(value):
                    problems.append(f"{'.'.join((*path, str(i)))}: must be a finite number, not {value}")
                elif items.get("type") == "integer" and value.is_integer():
                    node[i] = int(value)
            else:
                problems += _normalise_numbers(value, items, (*path, str(i)))
    return problems


def _check_durations(doc: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """The schema's pattern admits "9999...9h"; its value must still be a finite number of seconds."""
    problems: list[str] = []
    for leaf_path, leaf in _leaves(schema):
        if leaf.get("$ref") != "#/$defs/duration":
            continue
        node: Any = doc
        for key in leaf_path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:
            continue
        try:
            seconds = parse_duration(node)
        except ValueError as exc:
            problems.append(f"{'.'.join(leaf_path)}: {exc}")
            continue
        if not math.isfinite(seconds):
            problems.append(f"{'.'.join(leaf_path)}: duration out of range")
    return problems


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, override, validate and freeze the configuration.

    ``overrides`` (dotted keys, e.g. ``{"port": 0}``) come from command-line
    flags and win over both the file and the environment.
    """
    environ = os.environ if environ is None else environ
    schema = load_schema()
    problems: list[str] = []

    config_path = Path(path) if path else DEFAULT_CONFIG_PATH
    doc: dict[str, Any] = {}
    if config_path.exists():
        try:
            with config_path.open("rb") as fh:
                doc = tomllib.load(fh)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{config_path}: not valid TOML: {exc}"]) from exc
        except OSError as exc:
            raise ConfigError([f"{config_path}: cannot read: {exc.strerror or exc}"]) from exc
    elif path:
        raise ConfigError([f"{config_path}: no such file"])

    for leaf_path, leaf in _leaves(schema):
        for name in env_names(leaf_path, leaf):
            raw = environ.get(name)
            if raw is None or (raw == "" and leaf.get("type") != "string"):
                continue
            try:
                _set_path(doc, leaf_path, _parse_env_value(raw, leaf), leaf.get("default"))
            except ValueError as exc:
                problems.append(f"{'.'.join(leaf_path)} (from ${name}): {exc}")
            break

    for dotted, value in (overrides or {}).items():
        _set_path(doc, tuple(dotted.split(".")), value)

    _fill_defaults(doc, schema)
    problems += _normalise_numbers(doc, schema, ())
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    secret_paths = {path for path, leaf in _leaves(schema) if leaf.get("x-secret")}
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        if tuple(str(p) for p in error.absolute_path) in secret_paths:
            # jsonschema quotes the bad value; a secret must not reach stderr or a log.
            problems.append(f"{where}: invalid value (not shown: secret), failed {error.validator!r}")
        else:
            problems.append(f"{where}: {error.message}")

    if not problems:
        problems += _check_durations(doc, schema)
    if not problems:
        for name, provider in doc["providers"].items():
            if provider.get("access_token") and "allowed_models" in provider and not provider["allowed_models"]:
                problems.append(f"providers.{name}.allowed_models: must not be empty when the provider is enabled")
    if problems:
        raise ConfigError(problems)
    # Relative paths (actors file, events file, spool) resolve against the config
    # file's directory, whatever the working directory; for the embedded default
    # that is the repository root, where its paths (conf/actors.json, var/) point.
    base_dir = config_path.resolve().parent if path else DEFAULT_CONFIG_PATH.resolve().parent.parent
    return _freeze(doc, base_dir=str(base_dir))


def _freeze(doc: dict[str, Any], *, base_dir: str) -> Config:
    d = parse_duration
    p = doc["providers"]
    a = doc["actors"]
    f = doc["flagging"]
    t = doc["telemetry"]
    return Config(
        host=doc["host"],
        port=doc["port"],
        processes=doc["processes"],
        environment=doc["environment"],
        diagnostics_secret=doc["diagnostics_secret"],
        server=ServerConfig(**doc["server"]),
        redis=RedisConfig(**doc["redis"]),
        upstream=UpstreamConfig(**doc["upstream"]),
        providers=ProvidersConfig(
            anthropic=AnthropicConfig(
                **{
                    **p["anthropic"],
                    "allowed_models": tuple(p["anthropic"]["allowed_models"]),
                    "allowed_betas": tuple(p["anthropic"]["allowed_betas"]),
                    "max_tokens_caps": tuple((k, int(v)) for k, v in p["anthropic"]["max_tokens_caps"].items()),
                }
            ),
            openai=OpenAIConfig(**{**p["openai"], "allowed_models": tuple(p["openai"]["allowed_models"])}),
            fireworks=FireworksConfig(
                **{**p["fireworks"], "allowed_models": tuple(p["fireworks"]["allowed_models"])}
            ),
            google=GoogleConfig(**{**p["google"], "allowed_models": tuple(p["google"]["allowed_models"])}),
            sourcegraph_embeddings=SourcegraphEmbeddingsConfig(**p["sourcegraph_embeddings"]),
        ),
        embeddings=EmbeddingsConfig(
            allowed_models=tuple(doc["embeddings"]["allowed_models"]),
            openai_dimensions=dict(doc["embeddings"]["openai_dimensions"]),
        ),
        flagging=FlaggingConfig(
            **{
                **f,
                "allowed_prompt_patterns": tuple(s.lower() for s in f["allowed_prompt_patterns"]),
                "blocked_prompt_patterns": tuple(s.lower() for s in f["blocked_prompt_patterns"]),
                "flagged_model_names": tuple(s.lower() for s in f["flagged_model_names"]),
                "flagged_prompt_recorder_ttl": d(f["flagged_prompt_recorder_ttl"]),
            }
        ),
        actors=ActorsConfig(
            **{
                **a,
                "sources": tuple(a["sources"]),
                "identifiers_to_log_for": tuple(a["identifiers_to_log_for"]),
                "concurrency_limit_interval": d(a["concurrency_limit_interval"]),
                "local_cache_ttl": d(a["local_cache_ttl"]),
                "sources_sync_interval": d(a["sources_sync_interval"]),
                "sources_cache_ttl": d(a["sources_cache_ttl"]),
                "dotcom_actor_cooldown": d(a["dotcom_actor_cooldown"]),
                "subscription_actor_cooldown": d(a["subscription_actor_cooldown"]),
            }
        ),
        events=EventsConfig(**doc["events"]),
        telemetry=TelemetryConfig(
            **{**t, "notify_thresholds": {k: tuple(sorted(v)) for k, v in t["notify_thresholds"].items()}}
        ),
        base_dir=base_dir,
    )


def resolve_path(config: Config, value: str) -> Path:
    candidate = Path(value)
    return candidate if candidate.is_absolute() else Path(config.base_dir) / candidate
