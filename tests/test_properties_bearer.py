"""Property tests for the Authorization parser and token helpers (actors/tokens.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.base import InvalidTokenFormat
from actors.tokens import check_token_format, constant_time_equal, parse_bearer, token_sha256
from errors import BadRequest
from tests.test_fuzz_support import counted, examples, fuzz_summary  # noqa: F401  (fixture)

# Header values as Tornado hands them over: latin-1 decoded, any byte but CR/LF.
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255, blacklist_characters="\r\n"), max_size=120)
HEX64 = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)
PREFIX = st.sampled_from(["sgd_", "slk_", "sgs_"])


@settings(max_examples=examples(500), deadline=None)
@given(header=st.one_of(HEADER_TEXT, st.builds(lambda s, t: s + t, st.sampled_from(["Bearer ", "bearer ", "BEARER ", "Basic ", "Bearer", " Bearer "]), HEADER_TEXT)))
@counted("bearer: arbitrary Authorization headers")
def test_any_header_is_a_token_or_a_400(header: str) -> None:
    try:
        token = parse_bearer(header)
    except BadRequest as exc:
        assert exc.status == 400
        # Never echo what may be a credential back to the client.
        if exc.message.startswith("invalid token type "):
            shown = exc.message.removeprefix("invalid token type ")
            assert not shown.lower().startswith(("sgd_", "slk_", "sgs_", "sk-")) and len(shown) <= 20
        else:
            assert exc.message == "token type missing in Authorization header"
        return
    if not header:
        assert token == ""
    else:
        scheme, _, rest = header.partition(" ")
        assert scheme.lower() == "bearer" and token == rest


@settings(max_examples=examples(300), deadline=None)
@given(token=HEADER_TEXT)
@counted("bearer: round trip")
def test_bearer_round_trip_keeps_the_token_verbatim(token: str) -> None:
    # The reference does not trim the token; neither do we.
    assert parse_bearer("Bearer " + token) == token
    assert parse_bearer("bEaReR " + token) == token


@settings(max_examples=examples(300), deadline=None)
@given(prefix=PREFIX, body=HEX64)
@counted("bearer: well-formed tokens")
def test_well_formed_tokens_pass_the_format_check(prefix: str, body: str) -> None:
    check_token_format(prefix + body)


@settings(max_examples=examples(500), deadline=None)
@given(prefix=PREFIX, body=HEADER_TEXT)
@counted("bearer: malformed tokens")
def test_known_prefix_with_a_bad_body_is_invalid_format(prefix: str, body: str) -> None:
    token = prefix + body
    well_formed = len(body) == 64 and all(c in "0123456789abcdefABCDEF" for c in body)
    if well_formed:
        check_token_format(token)
    else:
        with pytest.raises(InvalidTokenFormat):
            check_token_format(token)


@settings(max_examples=examples(300), deadline=None)
@given(token=st.text(max_size=100))
@counted("bearer: hashing and comparison")
def test_hash_and_constant_time_compare_accept_any_text(token: str) -> None:
    digest = token_sha256(token)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert constant_time_equal(token, token)
    assert not constant_time_equal(token, token + "x")


@pytest.mark.parametrize(
    ("header", "shown"),
    [
        ("Basic abc", "invalid token type Basic"),
        ("token abc", "invalid token type token"),
        ("sgd_" + "a" * 64 + " trailing", "invalid token type (not shown)"),
        ("sk-ant-api03-secret " + "x", "invalid token type (not shown)"),
        ("A" * 50 + " x", "invalid token type (not shown)"),
    ],
)
def test_scheme_is_echoed_only_when_it_is_not_a_credential(header: str, shown: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_bearer(header)
    assert info.value.message == shown


def test_missing_scheme_is_400_without_echo() -> None:
    with pytest.raises(BadRequest) as info:
        parse_bearer("sgd_" + "a" * 64)
    assert info.value.message == "token type missing in Authorization header"
