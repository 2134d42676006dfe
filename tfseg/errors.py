"""Exceptions for bad input: their message names the file, row or field and the reason."""


class DataError(ValueError):
    """Input data (CSV, scans, records) is malformed or inconsistent."""


class ConfigError(ValueError):
    """A configuration key or value is unknown or invalid."""


def check_ranges(what: str, checks) -> None:
    """ConfigError naming every (name, value, ok, need) that is not ok, e.g. 'records: workers 0 (need >= 1)'."""
    wrong = [f"{name} {value} (need {need})" for name, value, ok, need in checks if not ok]
    if wrong:
        raise ConfigError(f"{what}: {', '.join(wrong)}")


class TrainingStopped(RuntimeError):
    """Training cannot go on (the loss became NaN, a worker was lost, a shard became unreadable); the last
    good checkpoint is kept, and the same command resumes from it."""
