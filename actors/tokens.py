"""Bearer parsing and token formats (reference 2.1 and 2.4)."""

from __future__ import annotations

import hashlib
import hmac
import string

from actors.base import InvalidTokenFormat
from errors import BadRequest

DOTCOM_USER_PREFIX = "sgd_"
SUBSCRIPTION_PREFIX = "slk_"
LEGACY_SUBSCRIPTION_PREFIX = "sgs_"
KNOWN_PREFIXES = (DOTCOM_USER_PREFIX, SUBSCRIPTION_PREFIX, LEGACY_SUBSCRIPTION_PREFIX)
TOKEN_LENGTH = 68
_HEX = frozenset(string.hexdigits)
_MAX_SCHEME_SHOWN = 20
# Prefixes of credentials a client might paste without a scheme (gateway tokens, provider keys).
_CREDENTIAL_PREFIXES = ("sgd_", "slk_", "sgs_", "sgp_", "sk-", "sk_")


def parse_bearer(header: str | None) -> str:
    """The token from an Authorization header; "" when absent (not an error)."""
    if not header:
        return ""
    scheme, sep, token = header.partition(" ")
    if not sep:
        raise BadRequest("token type missing in Authorization header")
    if scheme.lower() != "bearer":
        # The reference echoes the scheme; a client that forgot "Bearer " would
        # see its token echoed (and so would whatever logs error bodies).
        shown = scheme if _looks_like_scheme(scheme) else "(not shown)"
        raise BadRequest(f"invalid token type {shown}")
    return token


def _looks_like_scheme(scheme: str) -> bool:
    """An auth scheme name (RFC 9110 token, short), not a pasted credential."""
    return (
        0 < len(scheme) <= _MAX_SCHEME_SHOWN
        and scheme.isascii()
        and all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in scheme)
        and not scheme.lower().startswith(_CREDENTIAL_PREFIXES)
    )


def normalise_subscription_token(token: str) -> str:
    """The reference accepts the legacy sgs_ prefix by rewriting its first occurrence."""
    return token.replace(LEGACY_SUBSCRIPTION_PREFIX, SUBSCRIPTION_PREFIX, 1)


def check_token_format(token: str) -> None:
    """A known prefix must be followed by exactly 64 hex characters (SPEC point 2: 401)."""
    for prefix in KNOWN_PREFIXES:
        if token.startswith(prefix):
            body = token[len(prefix):]
            if len(token) != TOKEN_LENGTH or not _HEX.issuperset(body):
                raise InvalidTokenFormat()
            return


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))
