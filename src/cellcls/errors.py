"""Errors that name the setting or file at fault and what was expected."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the setting and the allowed values."""


class DataError(ValueError):
    """A data set on disk does not have the expected layout or content."""
