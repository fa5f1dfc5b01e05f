"""The one exception base of Sluice.

Every error a user can fix (a bad setting, an unreachable broker, a missing
model, a malformed record) is a `SluiceError` subclass whose message says what
to do; the CLI prints that message and exits non-zero without a traceback
(`sluice --debug` shows it). Each package adds its own subclasses. It lives in
`schemas/`, the bottom floor, so that every package can raise it.
"""

from __future__ import annotations


class SluiceError(Exception):
    """A failure with a message a user can act on."""


class ConfigError(SluiceError, ValueError):
    """A setting has a value Sluice cannot work with."""


def redact_url(url: str) -> str:
    """`url` with the password of its user-info replaced, for anything printed or logged
    (DSNs and Redis URLs carry credentials)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
