"""Errors that reach the user as one clear line and a non-zero exit.

The base class and the audio errors (:class:`InputError`, exit 2;
:class:`DeviceError`, exit 4) come from :mod:`audio.errors`, because the
audio layer raises them and must not import the application.
"""

from __future__ import annotations

from audio.errors import DeviceError, InputError, UserError

__all__ = ["UserError", "ConfigError", "InputError", "ModelError", "DeviceError"]


class ConfigError(UserError):
    """A configuration key is unknown, missing, of the wrong type or out of range."""


class ModelError(UserError):
    """A bundled model package is not installed or its files are missing."""

    exit_code = 3
