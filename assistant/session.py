"""One conversation: a pipeline of stages over the shared models.

A :class:`Session` owns everything per-conversation (the pipeline built by
:func:`pipeline.builder.build_pipeline` with its turn controller and
history, the report) and borrows the models from
:class:`~assistant.models.Models`. This module maps the config onto the
pipeline's typed settings (:func:`pipeline_settings`) and the loaded models
onto its components (:func:`components_of`). Audio comes from any async iterator of
:class:`~pipeline.frames.AudioFrame` (a file at real-time pace, a
microphone, later a websocket) and reply audio goes to an
:class:`~pipeline.playback.AudioOutput`.

:class:`TurnReport` turns the bus events into the per-turn milestones and
latencies written to REPORT.json.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pipeline.asr import ASRStage, WhisperTranscriber
from pipeline.builder import ASRSettings, ChunkerSettings, Components, HistorySettings, PipelineSettings, build_pipeline
from pipeline.frames import AudioFrame, now
from pipeline.playback import AudioOutput, PlaybackStage
from pipeline.report import TurnReport
from pipeline.runtime import EventBus, PipelineContext, Stage, Watchdog, budgets_of
from pipeline.tts import PiperSynthesizer, TTSStage
from pipeline.turns import Conversation, EndpointRule, TurnController, TurnSettings
from pipeline.vad import VADSettings

from .config import Config
from .models import Models

if TYPE_CHECKING:
    from audio.echo import EchoCanceller

log = logging.getLogger("assistant.session")

_session_ids = itertools.count(1)


# --------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------


def vad_settings(config: Config, with_silero: bool) -> VADSettings:
    """The VAD's settings from the config (one place for every user of it)."""
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


def pipeline_settings(
    config: Config, realtime: bool = True, with_silero: bool = True, with_smart_turn: bool = False
) -> PipelineSettings:
    """The config, as the typed settings the pipeline is built from."""
    a = config.asr
    c = config.chunker
    return PipelineSettings(
        vad=vad_settings(config, with_silero),
        asr=ASRSettings(
            sample_rate=config.audio.input_rate,
            partial_interval_ms=a.partial_interval_ms,
            min_partial_audio_ms=a.min_partial_audio_ms,
        ),
        chunker=ChunkerSettings(
            first_min_words=c.first_min_words,
            first_max_words=c.first_max_words,
            min_words=c.min_words,
            max_words=c.max_words,
        ),
        output_rate=config.audio.output_rate,
        error_reply=config.llm.error_phrase,
        history=HistorySettings(config.llm.system_prompt, config.llm.history_tokens),
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
        ),
        budgets=tuple(budgets_of(config)),
    )


def components_of(models: Models, config: Config) -> Components:
    """The loaded models as the pipeline's components."""
    a = config.asr
    rate = config.audio.output_rate
    return Components(
        transcriber=WhisperTranscriber(models.whisper, beam_size=a.beam_size, language=a.language, window_s=a.window_s),
        llm=models.llm,
        synthesizer=PiperSynthesizer(models.piper, config.tts.length_scale),
        asr_executor=models.asr_executor,
        tts_executor=models.tts_executor,
        silero=models.silero.probabilities if models.silero is not None else None,
        turn_scorer=models.smart_turn,
        turn_executor=models.turn_executor,
        phrase=lambda text: models.phrase(text, rate),
    )


LIVE_TURNS_KEPT = 100
"""Closed turns a long-lived session's report holds (a kiosk runs for weeks)."""


class Session:
    """One conversation through the full pipeline, over the shared models."""

    def __init__(
        self,
        models: Models,
        config: Config,
        output: AudioOutput,
        session_id: str | None = None,
        realtime: bool = True,
        echo_canceller: EchoCanceller | None = None,
        keep_turns: int | None = None,
    ) -> None:
        """``keep_turns``: how many closed turns the report holds (None: all,
        for a file's report; live runs bound it, see TurnReport)."""
        self.id = session_id or f"s{next(_session_ids)}"
        # False for input fed faster than real time: its clock is
        # compressed, so budgets are still measured and reported but their
        # policies would act on meaningless deadlines, and turn-taking (who
        # speaks when) has no meaning: every turn is answered in order.
        self.realtime = realtime
        # Removes the assistant's own voice from the input (a loudspeaker and
        # a microphone in one room); whoever plays the audio feeds it the
        # playback reference.
        self.echo_canceller = echo_canceller
        self.config = config
        self.models = models
        self.output = output
        settings = pipeline_settings(
            config, realtime, with_silero=models.silero is not None, with_smart_turn=models.smart_turn is not None
        )
        self.pipeline = build_pipeline(components_of(models, config), settings, output, self.id)
        self.origin = now()
        self.report = TurnReport(
            self.bus, self.origin, config.audio.output_rate, self.watchdog, keep=keep_turns,
            input_rate=config.audio.input_rate,
        )

    @property
    def ctx(self) -> PipelineContext:
        return self.pipeline.ctx

    @property
    def bus(self) -> EventBus:
        return self.pipeline.bus

    @property
    def stages(self) -> list[Stage]:
        return self.pipeline.stages

    @property
    def controller(self) -> TurnController:
        return self.pipeline.controller

    @property
    def conversation(self) -> Conversation:
        return self.pipeline.conversation

    @property
    def watchdog(self) -> Watchdog:
        return self.pipeline.watchdog

    @property
    def asr(self) -> ASRStage:
        return self.pipeline.asr

    @property
    def tts(self) -> TTSStage:
        return self.pipeline.tts

    @property
    def playback(self) -> PlaybackStage:
        return self.pipeline.playback

    def cancel_turn(self, turn_id: int, reason: str = "cancelled") -> bool:
        return self.ctx.cancel_turn(turn_id, reason)

    async def run(self, source: AsyncIterator[AudioFrame]) -> None:
        """Feed the source through the pipeline; return when every turn is done."""
        canceller = self.echo_canceller
        await self.pipeline.run(source, preprocess=canceller.process if canceller is not None else None)
