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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any


from pipeline.asr import ASRStage, WhisperTranscriber
from pipeline.builder import ASRSettings, ChunkerSettings, Components, HistorySettings, PipelineSettings, build_pipeline
from pipeline.frames import (
    AudioFrame,
    BudgetExceeded,
    Event,
    LLMDone,
    LLMToken,
    ReplyAudioEnded,
    ReplyCancelled,
    ReplyAudioStarted,
    ReplyInterrupted,
    SpeechStarted,
    SpeechStopped,
    StageError,
    TextChunk,
    TranscriptFinal,
    TranscriptPartial,
    TTSFirstAudio,
    TurnCancelled,
    TurnCompleted,
    now,
)
from pipeline.playback import AudioOutput, PlaybackStage
from pipeline.runtime import (
    BUDGETED_STAGES,
    REPLY_MILESTONES,
    Budget,
    EventBus,
    PipelineContext,
    Stage,
    Watchdog,
)
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
# Report
# --------------------------------------------------------------------------


@dataclass
class TurnRecord:
    turn_id: int
    transcript: str = ""
    partials: list[str] = field(default_factory=list)
    reply: str = ""
    stamps: dict[str, float] = field(default_factory=dict)
    status: str = "open"
    cancel_reason: str | None = None
    errors: list[str] = field(default_factory=list)
    asr_final_reused: bool | None = None
    llm_tokens: int = 0
    chunks: list[str] = field(default_factory=list)
    reply_samples: int = 0
    budget_events: list[dict[str, Any]] = field(default_factory=list)
    early_reply: bool = False
    replies_discarded: int = 0
    asr_final_forced: bool = False
    interrupted: bool = False
    heard_text: str | None = None
    barge_in_stop_ms: float | None = None
    barge_in: bool = False  # this turn itself interrupted a reply

    def stamp(self, name: str, at: float) -> None:
        self.stamps.setdefault(name, at)


# Milestones in the order a turn reaches them, and each stage's latency as
# (name, from milestone, to milestone).
MILESTONES = [
    "speech_start",
    "speech_end",
    "vad_end",
    "asr_final",
    "llm_first_token",
    "first_chunk",
    "tts_first_audio",
    "first_audio_out",
    "reply_end",
]
STAGE_LATENCIES = [
    ("end_of_speech_detect", "speech_end", "vad_end"),
    ("asr_final", "vad_end", "asr_final"),
    ("llm_first_token", "asr_final", "llm_first_token"),
    ("first_chunk", "llm_first_token", "first_chunk"),
    ("tts_first_audio", "first_chunk", "tts_first_audio"),
    ("audio_out", "tts_first_audio", "first_audio_out"),
    ("voice_to_voice", "speech_end", "first_audio_out"),
]


class TurnReport:
    """Collects each turn's transcript, reply and milestone stamps from the bus."""

    def __init__(self, bus: EventBus, origin: float, output_rate: int, watchdog: Watchdog | None = None) -> None:
        self.origin = origin
        self.output_rate = output_rate
        self.watchdog = watchdog
        self.turns: dict[int, TurnRecord] = {}
        self.listeners: list[Callable[[TurnRecord], None]] = []
        bus.subscribe(self.observe)

    def _turn(self, turn_id: int) -> TurnRecord:
        if turn_id not in self.turns:
            self.turns[turn_id] = TurnRecord(turn_id)
        return self.turns[turn_id]

    def observe(self, event: Event) -> None:
        if event.turn_id is None:
            return
        t = self._turn(event.turn_id)
        match event:
            case SpeechStarted():
                t.stamp("speech_start", event.onset_at)
                t.barge_in = event.barge_in
            case ReplyInterrupted():
                t.interrupted = True
                t.heard_text = event.heard_text
                t.barge_in_stop_ms = round(event.stop_ms, 1)
                t.stamp("reply_end", event.stopped_at)
                t.reply_samples = event.played_samples
            case SpeechStopped():
                t.stamp("speech_end", event.last_voiced_at)
                t.stamp("vad_end", event.at)
            case TranscriptPartial():
                t.partials.append(event.text)
            case TranscriptFinal() if event.speculative:
                t.early_reply = True
            case ReplyCancelled():
                t.replies_discarded += 1
                for name in REPLY_MILESTONES:
                    t.stamps.pop(name, None)
                t.chunks.clear()
                t.llm_tokens = 0
            case TranscriptFinal():
                t.transcript = event.text
                t.asr_final_reused = event.reused
                t.asr_final_forced = event.forced
                t.stamp("asr_final", event.at)
            case LLMToken():
                t.stamp("llm_first_token", event.at)
                t.llm_tokens += 1
            case LLMDone():
                t.reply = event.text
                t.stamp("llm_done", event.at)
            case TextChunk():
                if event.text:
                    t.stamp("first_chunk", event.at)
                    t.chunks.append(event.text)
            case TTSFirstAudio():
                t.stamp("tts_first_audio", event.at)
            case ReplyAudioStarted():
                t.stamp("first_audio_out", event.at)
            case ReplyAudioEnded():
                t.stamp("reply_end", event.at)
                t.reply_samples = event.samples
            case TurnCompleted():
                t.status = "completed"
                self._closed(t)
            case TurnCancelled():
                t.status = "interrupted" if t.interrupted else "cancelled"
                t.cancel_reason = event.reason
                self._closed(t)
            case StageError():
                t.errors.append(f"{event.stage}: {event.message}")
            case BudgetExceeded():
                t.budget_events.append(
                    {
                        "stage": event.stage,
                        "budget_ms": event.budget_ms,
                        "elapsed_ms": event.elapsed_ms,
                        "policy": event.policy,
                        "at_ms": round((event.at - self.origin) * 1000, 1),
                    }
                )
            case _:
                pass

    def _closed(self, t: TurnRecord) -> None:
        for listener in self.listeners:
            listener(t)

    def to_json(self, include_dropped: bool = False) -> list[dict[str, Any]]:
        out = []
        for t in sorted(self.turns.values(), key=lambda r: r.turn_id):
            if not include_dropped and t.status == "cancelled" and not t.transcript:
                continue  # noise that opened a turn but held no words
            out.append(self.turn_json(t))
        return out

    def turn_json(self, t: TurnRecord) -> dict[str, Any]:
        ms = {k: round((v - self.origin) * 1000, 1) for k, v in t.stamps.items()}
        # A reply started at the pause reaches its milestones before the
        # turn ends: the wait a stage adds is then 0, never negative.
        latency = {
            name: round(max(0.0, t.stamps[b] - t.stamps[a]) * 1000, 1)
            for name, a, b in STAGE_LATENCIES
            if a in t.stamps and b in t.stamps
        }
        return {
            "turn": t.turn_id,
            "status": t.status,
            "cancel_reason": t.cancel_reason,
            "transcript": t.transcript,
            "reply": t.reply,
            "reply_chunks": t.chunks,
            "partial_transcripts": t.partials,
            "asr_final_reused_partial_decode": t.asr_final_reused,
            "asr_final_forced_by_budget": t.asr_final_forced,
            "reply_started_at_pause": t.early_reply,
            "early_replies_discarded": t.replies_discarded,
            "llm_tokens": t.llm_tokens,
            "reply_audio_seconds": round(t.reply_samples / self.output_rate, 3),
            "interrupted": t.interrupted,
            "heard_text": t.heard_text,
            "barge_in_stop_ms": t.barge_in_stop_ms,
            "opened_by_barge_in": t.barge_in,
            "milestones_ms": {k: ms[k] for k in MILESTONES if k in ms},
            "latency_ms": latency,
            "voice_to_voice_ms": latency.get("voice_to_voice"),
            "budgets": self.watchdog.results.get(t.turn_id, {}) if self.watchdog is not None else {},
            "budget_exceeded": t.budget_events,
            "errors": t.errors,
        }


# --------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------


def budgets_of(config: Config) -> list[Budget]:
    """The configured budgets (a budget of 0 ms is none)."""
    b = config.budgets
    budgets = [Budget(stage, getattr(b, f"{stage}_ms"), getattr(b.policies, stage)) for stage in BUDGETED_STAGES]
    return [budget for budget in budgets if budget.ms > 0]


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


def pipeline_settings(config: Config, realtime: bool = True, with_silero: bool = True) -> PipelineSettings:
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
        history=HistorySettings(config.llm.system_prompt, config.llm.history_tokens),
        turns=TurnSettings(
            endpoint=EndpointRule(config.vad.complete_silence_ms, config.vad.incomplete_silence_ms),
            early_reply=a.final_at_pause,
            realtime=realtime,
            barge_in=config.barge_in.enabled,
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
        phrase=lambda text: models.phrase(text, rate),
    )


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
    ) -> None:
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
        settings = pipeline_settings(config, realtime, with_silero=models.silero is not None)
        self.pipeline = build_pipeline(components_of(models, config), settings, output, self.id)
        self.origin = now()
        self.report = TurnReport(self.bus, self.origin, config.audio.output_rate, self.watchdog)

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
