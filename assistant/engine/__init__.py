"""Where the language model runs: in this process, or on a vLLM server.

``llm.engine: local`` (one box: a laptop, a kiosk) runs vLLM's ``AsyncLLM``
in-process (:mod:`.local`); ``llm.engine: remote`` (a fleet) streams from any
OpenAI-compatible vLLM server (:mod:`.remote`), such as the one
``voice-assistant engine`` starts with the same settings (:mod:`.server`).
Either way the pipeline's LLM stage sees one
:class:`pipeline.llm.LanguageModel`; scale-out (data and tensor parallel,
Ray, vLLM's router) is vLLM's own, behind the remote URL.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..loading import Progress, print_progress
from pipeline.llm import EngineUnavailable

__all__ = ["EngineUnavailable", "load_language_model"]


def load_language_model(config: Config, progress: Progress = print_progress) -> Any:
    """The configured engine, ready for requests (a remote one may be down:
    it is probed in the background and turns fail with an apology meanwhile)."""
    if config.llm.engine == "remote":
        from .remote import RemoteModel, RemoteSettings

        settings = RemoteSettings.from_config(config)
        progress(f"language model: the vLLM server at {settings.url}")
        return RemoteModel(settings)
    from .local import load_local

    return load_local(config, progress)
