"""Exceptions for bad input: their message names the file, row or field and the reason."""


class DataError(ValueError):
    """Input data (CSV, scans, records) is malformed or inconsistent."""


class ConfigError(ValueError):
    """A configuration key or value is unknown or invalid."""
