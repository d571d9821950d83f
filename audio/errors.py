"""Errors of the audio layer that reach the user as one clear line.

:class:`UserError` is defined here, the lowest layer that reports problems a
user can fix, so that the application's ``except UserError`` (and its exit
codes) also covers bad audio files and missing devices without the audio
layer importing the application; :mod:`assistant.errors` re-exports all
three and adds its own kinds.
"""

from __future__ import annotations

__all__ = ["UserError", "InputError", "DeviceError", "one_line"]


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line, no traceback."""

    exit_code = 2


class InputError(UserError):
    """The input audio is missing, unreadable, empty or too long."""


class DeviceError(UserError):
    """No usable audio device (or PortAudio itself is missing)."""

    exit_code = 4


def one_line(error: BaseException | str) -> str:
    """Collapse an exception's text onto one line for a user message."""
    text = str(error).strip()
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return " ".join(text.split())
