"""Errors that reach the user as one clear line and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line, no traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration key is unknown, missing, of the wrong type or out of range."""


class InputError(UserError):
    """The input audio is missing, unreadable, empty or too long."""


class ModelError(UserError):
    """A bundled model package is not installed or its files are missing."""

    exit_code = 3


class DeviceError(UserError):
    """No usable audio device (or PortAudio itself is missing)."""

    exit_code = 4
