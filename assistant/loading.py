"""What loading a model needs wherever it happens: progress lines and a module check.

:mod:`assistant.models` (Whisper, piper, Silero, Smart Turn) and
:mod:`assistant.engine` (the language model) both load things that take
seconds and may be missing; both say so the same way, from here, so that
neither has to import the other for it.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

from .errors import ModelError

__all__ = ["Progress", "print_progress", "require_module"]

Progress = Callable[[str], None]
"""Where a loader says what it is doing (a line each: "loading ...", "loaded ... in 1.2 s")."""


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def require_module(module: str, install: str) -> None:
    """A missing package is one line that says how to install it, not an ImportError."""
    if importlib.util.find_spec(module) is None:
        raise ModelError(f"the {module} module is not installed: {install}")
