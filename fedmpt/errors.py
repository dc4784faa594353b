"""Exception hierarchy of the ``fedmpt`` library.

Every error raised for a user mistake is one of these, with the offending parameter, file or value in the
message; a bare stack trace from a dependency is never the answer to bad input.
"""


class FedMPTError(Exception):
    """Base class of every error raised by ``fedmpt`` on purpose."""


class ConfigError(FedMPTError, ValueError):
    """A configuration value is unknown, of the wrong type or out of its valid range."""


class DatasetError(FedMPTError):
    """A dataset file is missing, unreadable, truncated or inconsistent (the message names the file)."""


class BackboneUnavailableError(FedMPTError):
    """The requested CLIP backbone weights cannot be had (offline, missing file, unknown name)."""


class ConditionsError(FedMPTError):
    """A conditions file is malformed, or was made for another class list."""


class RunDirectoryError(FedMPTError):
    """A run directory is missing, already finished, inconsistent or was made for another config."""


class FederationError(FedMPTError):
    """The federation cannot go on (too few clients connected, conflicting partitions)."""


class SecureAggregationError(FedMPTError):
    """A secure-aggregation stage cannot be run by this node (missing keys, foreign message, bad state)."""


def check_positive_int(owner: str, name: str, value: object) -> int:
    """``value`` if it is an integer >= 1 (not a bool); else a :class:`ConfigError` naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}.{name} must be an integer >= 1, got {value!r}")
    return value


def check_int(key: str, value: object, low: int, *, where: str = "run config") -> None:
    """Raise ConfigError naming ``where`` and ``key`` unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where} {key!r} must be an integer >= {low}, got {value!r}")
