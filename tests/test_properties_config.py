"""Property tests for configuration loading (conf/loader.py).

Whatever the file and the environment hold, loading ends in a Config whose
numbers are all finite and whose integers are ints, or in one ConfigError
naming the bad keys; never another exception, and never a secret value in
the error text.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conf.loader import ConfigError, _leaves, env_names, load_config, load_schema
from tests.test_fuzz_support import counted, examples, fuzz_summary  # noqa: F401  (fixture)

SCHEMA = load_schema()
LEAVES = list(_leaves(SCHEMA))
SECRET_LEAVES = {path for path, leaf in LEAVES if leaf.get("x-secret")}

NUMBERISH = st.sampled_from(
    ["0", "-1", "1", "65536", "1e400", "-1e400", "nan", "inf", "-inf", "1.5", "2048.0", "99999999999999999999999",
     "0x10", "1_000", " 7 ", "", "true", "off", "[]", "[1, 2]", '{"a": [5]}', "{}", "[", "10s", "1h30m", "9" * 400 + "h"]
)
ENV_VALUE = st.one_of(NUMBERISH, st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40))


def assert_sane(config: Any) -> None:
    """Every number in the frozen config is finite; nothing is NaN or infinite."""
    if dataclasses.is_dataclass(config):
        for field in dataclasses.fields(config):
            assert_sane(getattr(config, field.name))
    elif isinstance(config, float):
        assert math.isfinite(config)
    elif isinstance(config, (list, tuple)):
        for item in config:
            assert_sane(item)
    elif isinstance(config, dict):
        for item in config.values():
            assert_sane(item)


def load(path: Path | None, env: dict[str, str]) -> str:
    try:
        config = load_config(path, environ=env)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return str(exc)
    assert_sane(config)
    assert isinstance(config.server.max_body_bytes, int) and isinstance(config.port, int)
    return ""


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@counted("config: environment overrides")
def test_any_environment_loads_or_names_the_bad_keys(data: st.DataObject) -> None:
    chosen = data.draw(st.lists(st.sampled_from(LEAVES), min_size=1, max_size=4, unique_by=lambda leaf: leaf[0]))
    env: dict[str, str] = {}
    for path, leaf in chosen:
        name = data.draw(st.sampled_from(env_names(path, leaf)))
        env[name] = data.draw(ENV_VALUE)
    message = load(None, env)
    for path, leaf in chosen:
        if path in SECRET_LEAVES:
            for name in env_names(path, leaf):
                value = env.get(name, "")
                # A value also given to a non-secret key may rightly be quoted for that key.
                shared = any(v == value for n, v in env.items() if n != name)
                if len(value) >= 8 and not shared:
                    assert value not in message, f"secret {'.'.join(path)} echoed in {message!r}"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"


SCALAR = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(["10s", "1h", "9" * 400 + "h", "dev", "production", "fail_open", "http://127.0.0.1:1", "static"]),
)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly real keys with wrong or edge-case values, sometimes unknown keys."""
    doc: dict[str, Any] = {}
    for path, _leaf in draw(st.lists(st.sampled_from(LEAVES), max_size=5)):
        node = doc
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = draw(VALUE)
    if draw(st.booleans()):
        doc[draw(st.text(min_size=1, max_size=8))] = draw(VALUE)
    return doc


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(doc=documents())
@counted("config: TOML documents")
def test_any_toml_document_loads_or_names_the_bad_keys(doc: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items()) + "\n", encoding="utf-8", errors="surrogatepass")
    load(path, {})


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), st.binary(max_size=50).map(lambda b: b'host = "' + b + b'"\n')))
@counted("config: raw file bytes")
def test_any_file_bytes_load_or_fail_cleanly(raw: bytes, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_bytes(raw)
    load(path, {})


def test_specific_hostile_values(tmp_path: Path) -> None:
    cases = {
        b'host = "\xff"\n': "not valid TOML",
        b"[server]\nbody_timeout_s = nan\n": "server.body_timeout_s: must be a finite number",
        b"[server]\nidle_connection_timeout_s = inf\n": "server.idle_connection_timeout_s: must be a finite number",
        b'[actors]\nlocal_cache_ttl = "' + b"9" * 400 + b'h"\n': "actors.local_cache_ttl: duration out of range",
        b"[upstream]\nmax_clients = 99999999999999999999\n": "upstream.max_clients: out of range",
        b"diagnostics_secret = 123456789\n": "diagnostics_secret: invalid value (not shown: secret)",
    }
    for raw, expected in cases.items():
        path = tmp_path / "c.toml"
        path.write_bytes(raw)
        message = load(path, {})
        assert expected in message, (raw, message)
    assert "123456789" not in load(tmp_path / "c.toml", {})
    # An integer written as 2048.0 is accepted and becomes an int.
    (tmp_path / "d.toml").write_text("[server]\nmax_body_bytes = 2048.0\n")
    assert load_config(tmp_path / "d.toml", environ={}).server.max_body_bytes == 2048
    assert type(load_config(tmp_path / "d.toml", environ={}).server.max_body_bytes) is int
    # A directory where the file should be.
    assert "cannot read" in load(tmp_path, {})
    # Secrets given in the environment with the wrong shape are not echoed either.
    env = {"CODY_GATEWAY_TELEMETRY_NOTIFY_THRESHOLDS": "[1]", "CODY_GATEWAY_DIAGNOSTICS_SECRET": "s3cr3t-value-xyz"}
    assert "s3cr3t-value-xyz" not in load(None, env)
