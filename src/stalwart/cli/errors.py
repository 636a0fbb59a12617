"""The one exception the ``stalwart`` command's modules raise for a user's mistake."""

from __future__ import annotations

__all__ = ["CliError"]


class CliError(Exception):
    """A user mistake: printed as one message, never as a traceback, with exit code ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
