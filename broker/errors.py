"""Errors raised by the broker layer."""

from __future__ import annotations


class BrokerError(Exception):
    """Base class for everything the broker package raises."""


class ConfigError(BrokerError, ValueError):
    """A configuration value is missing or invalid."""


class DecodeError(BrokerError, ValueError):
    """A stream entry could not be decoded; carries the entry id and the reason."""

    def __init__(self, reason: str, entry_id: str = "", stream: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.entry_id = entry_id
        self.stream = stream


class ValidationError(BrokerError, ValueError):
    """An ingress query is well-formed on the wire but violates the contract."""


class EmbeddedServerError(BrokerError, RuntimeError):
    """The embedded Valkey server could not be started."""


class ConnectionFailed(BrokerError, ConnectionError):
    """No Redis server could be reached and none could be started."""
