"""The one place where the configuration becomes the pipeline's settings and components.

The config (:mod:`assistant.config`) is parsed once into typed sections;
here those sections become what :mod:`pipeline` is built from: its typed
settings (:func:`pipeline_settings`, :func:`vad_settings`,
:func:`budgets_of`) and the loaded models as components
(:func:`components_of`, :func:`transcriber_of`, :func:`synthesizer_of`,
:func:`conversation_of`, :func:`segmenter_of`). A session, the Wyoming
face, the naive baseline and the canned phrases all build theirs here, so
a config key means the same thing everywhere, and ``pipeline/`` never sees
the application's config.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Protocol

import numpy as np

from pipeline.asr import WhisperTranscriber
from pipeline.builder import ASRSettings, ChunkerSettings, Components, HistorySettings, PipelineSettings
from pipeline.chunker import Segmenter
from pipeline.llm import LanguageModel
from pipeline.runtime import BUDGETED, Budget
from pipeline.tts import PiperSynthesizer
from pipeline.tools import Toolbox, ToolChoice
from pipeline.turns import Conversation, EndpointRule, TurnSettings
from pipeline.vad import VADSettings

from .config import Config

__all__ = [
    "Loaded",
    "budgets_of",
    "chunker_settings",
    "components_of",
    "conversation_of",
    "history_settings",
    "pipeline_settings",
    "segmenter_of",
    "synthesizer_of",
    "transcriber_of",
    "vad_settings",
]


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


def vad_settings(config: Config, with_silero: bool) -> VADSettings:
    """The VAD's settings (the session's, the naive baseline's and ``converse``'s turn count)."""
    v = config.vad
    b = config.barge_in
    return VADSettings(
        barge_in=b.enabled,
        barge_in_min_speech_ms=b.min_speech_ms,
        barge_in_silero_threshold=b.silero_threshold if with_silero else None,
        barge_in_min_rms_dbfs=b.min_rms_dbfs,
        frame_ms=config.audio.frame_ms,
        aggressiveness=v.aggressiveness,
        min_speech_ms=v.min_speech_ms,
        silence_ms=v.silence_ms,
        pause_ms=v.pause_ms,
        preroll_ms=v.preroll_ms,
        max_utterance_s=v.max_utterance_s,
        silero_threshold=v.silero.threshold if with_silero else None,
    )


def chunker_settings(config: Config) -> ChunkerSettings:
    c = config.chunker
    return ChunkerSettings(
        first_min_words=c.first_min_words,
        first_max_words=c.first_max_words,
        min_words=c.min_words,
        max_words=c.max_words,
    )


def history_settings(config: Config) -> HistorySettings:
    return HistorySettings(config.llm.system_prompt, config.llm.history_tokens)


def budgets_of(config: Config) -> tuple[Budget, ...]:
    """The configured budgets, one per budgeted span (a budget of 0 ms is none)."""
    b = config.budgets
    budgets = (Budget(span, getattr(b, f"{span}_ms"), getattr(b.policies, span)) for span in BUDGETED)
    return tuple(budget for budget in budgets if budget.ms > 0)


def pipeline_settings(
    config: Config, realtime: bool = True, with_silero: bool = True, with_smart_turn: bool = False
) -> PipelineSettings:
    """The config, as the typed settings a session's pipeline is built from."""
    a = config.asr
    return PipelineSettings(
        vad=vad_settings(config, with_silero),
        asr=ASRSettings(
            sample_rate=config.audio.input_rate,
            partial_interval_ms=a.partial_interval_ms,
            min_partial_audio_ms=a.min_partial_audio_ms,
        ),
        chunker=chunker_settings(config),
        output_rate=config.audio.output_rate,
        error_reply=config.llm.error_phrase,
        history=history_settings(config),
        turns=TurnSettings(
            endpoint=EndpointRule(
                config.vad.complete_silence_ms,
                config.vad.incomplete_silence_ms,
                semantic_ms=config.vad.smart_turn.complete_silence_ms if with_smart_turn else None,
                semantic_threshold=config.vad.smart_turn.threshold,
            ),
            early_reply=a.final_at_pause,
            realtime=realtime,
            barge_in=config.barge_in.enabled,
            # the VAD's hangover plus the pause decode's usual lateness on a slow CPU
            await_words_ms=min(config.vad.incomplete_silence_ms, config.vad.silence_ms + 300),
            acknowledgement=config.budgets.acknowledgement,
            apology=config.budgets.apology,
            tool_choice=ToolChoice(config.tools.choice),
            preselect=config.tools.preselect,
            max_tool_rounds=config.tools.max_rounds,
            tool_apology=config.tools.apology,
        ),
        budgets=budgets_of(config),
    )


# --------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------


class Loaded(Protocol):
    """The models loaded once per process, as components are made of them
    (:class:`assistant.models.Models`; the loader uses this module, not the other way)."""

    whisper: Any
    piper: Any
    llm: LanguageModel
    silero: Any | None
    smart_turn: Any | None
    asr_executor: Executor
    tts_executor: Executor
    turn_executor: Executor
    toolbox: Toolbox | None

    def phrase(self, text: str, rate: int) -> np.ndarray: ...


def transcriber_of(models: Loaded, config: Config) -> WhisperTranscriber:
    """Whisper with the configured decoding (beam, language, encoder window)."""
    a = config.asr
    return WhisperTranscriber(models.whisper, beam_size=a.beam_size, language=a.language, window_s=a.window_s)


def synthesizer_of(voice: Any, config: Config) -> PiperSynthesizer:
    """A loaded piper voice at the configured speaking rate."""
    return PiperSynthesizer(voice, config.tts.length_scale)


def conversation_of(models: Loaded, config: Config) -> Conversation:
    """An empty history with the configured system prompt and token budget."""
    h = history_settings(config)
    return Conversation(h.system_prompt, h.budget_tokens, models.llm.count_tokens)


def segmenter_of(config: Config) -> Segmenter:
    """The reply chunker's rule, for text that is spoken outside a session (Wyoming's synthesize stream)."""
    c = chunker_settings(config)
    return Segmenter(c.first_min_words, c.min_words, c.max_words, c.first_max_words)


def components_of(models: Loaded, config: Config) -> Components:
    """The loaded models as a session's pipeline components."""
    rate = config.audio.output_rate
    return Components(
        transcriber=transcriber_of(models, config),
        llm=models.llm,
        synthesizer=synthesizer_of(models.piper, config),
        asr_executor=models.asr_executor,
        tts_executor=models.tts_executor,
        silero=models.silero.probabilities if models.silero is not None else None,
        turn_scorer=models.smart_turn,
        turn_executor=models.turn_executor,
        phrase=lambda text: models.phrase(text, rate),
        toolbox=models.toolbox,
    )
