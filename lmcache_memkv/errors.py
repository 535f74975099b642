"""Exceptions raised by the MemKV client library and transports."""

from __future__ import annotations


class MemKVError(Exception):
    """Base class for every MemKV error."""


class ProtocolError(MemKVError):
    """A frame broke the wire protocol (malformed, over a limit, out of order)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class ConnectError(MemKVError):
    """The node could not be reached."""


class MemKVTimeout(MemKVError, TimeoutError):
    """A call did not complete within its bound."""


class AuthError(MemKVError):
    """The node refused our credentials, or we have none and it needs them."""


class ServerError(MemKVError):
    """The node answered with an error frame."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ConfigError(MemKVError, ValueError):
    """An invalid configuration value; the message names the field."""
