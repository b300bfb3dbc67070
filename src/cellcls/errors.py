"""Errors that name the setting or file at fault and what was expected."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the setting and the allowed values."""


class DataError(ValueError):
    """A data set on disk does not have the expected layout or content."""


def nearest(key: str, valid: list[str] | tuple[str, ...]) -> str:
    """``"; did you mean 'x'?"`` for the closest valid name, or nothing when none is close."""
    import difflib

    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""
