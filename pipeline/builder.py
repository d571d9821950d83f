"""The stage chain of one session, built from typed settings in one place.

The session, the server, the benchmark, the scenarios and the tests all
build their pipeline here, so a new stage or rule is wired once::

    audio ─▶ VAD ─▶ ASR ┄┄ events ┄┄▶ TurnController ─▶ LLM ─▶ chunker ─▶ TTS ─▶ playback ─▶ output
              ▲                          │   │                                      ▲
              └── require_silence, ──────┘   └──── wait_to_play, stop, interject ───┘
                  set_assistant_speaking

Stages report events on the bus; the controller decides and commands. The
models (or fakes) come in as :class:`Components`, so this module knows
nothing about how they were loaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .asr import ASRStage, Transcriber
from .chunker import ChunkerStage
from .frames import END, AudioFrame
from .llm import LanguageModel, LLMStage
from .playback import AudioOutput, PlaybackStage
from .runtime import Budget, EventBus, PipelineContext, Stage, TurnRegistry, Watchdog, connect, run_stages
from .tools import Toolbox, ToolStage
from .tts import Synthesizer, TTSStage
from .turns import Conversation, Stages, TurnController, TurnSettings
from .vad import FrameClassifier, VADSettings, VADStage


@dataclass(frozen=True)
class ASRSettings:
    sample_rate: int = 16000
    partial_interval_ms: int = 450
    min_partial_audio_ms: int = 400


@dataclass(frozen=True)
class ChunkerSettings:
    first_min_words: int = 3
    first_max_words: int | None = None
    min_words: int = 4
    max_words: int = 30


@dataclass(frozen=True)
class HistorySettings:
    system_prompt: str = "You are a helpful voice assistant."
    budget_tokens: int = 1024


@dataclass(frozen=True)
class PipelineSettings:
    """Everything a session's pipeline is built from, typed per stage."""

    vad: VADSettings = field(default_factory=VADSettings)
    asr: ASRSettings = field(default_factory=ASRSettings)
    chunker: ChunkerSettings = field(default_factory=ChunkerSettings)
    output_rate: int = 22050
    # What the LLM stage says when its engine fails (see pipeline/llm.py).
    error_reply: str = "Sorry, I can't answer right now. Please try again in a moment."
    history: HistorySettings = field(default_factory=HistorySettings)
    turns: TurnSettings = field(default_factory=TurnSettings)
    budgets: tuple[Budget, ...] = ()


@dataclass
class Components:
    """The models a pipeline runs on (shared across sessions), or fakes."""

    transcriber: Transcriber
    llm: LanguageModel
    synthesizer: Synthesizer
    asr_executor: Executor | None = None
    tts_executor: Executor | None = None
    # Silero's per-chunk speech probabilities (the VAD's second opinion).
    silero: Callable[[np.ndarray], Any] | None = None
    # The semantic end-of-turn model's P(complete) of an utterance's audio
    # (endpointing's second opinion), and the executor it runs in.
    turn_scorer: Callable[[np.ndarray], float] | None = None
    turn_executor: Executor | None = None
    # webrtcvad stand-in for tests (None: webrtcvad itself).
    classifier: FrameClassifier | None = None
    # Canned phrase audio at the output rate (acknowledgement, apology).
    phrase: Callable[[str], np.ndarray] | None = None
    # The tools this process runs itself (config, MCP servers); None: none.
    toolbox: Toolbox | None = None


@dataclass
class Pipeline:
    """One session's stages, its turn controller and its budget watchdog."""

    ctx: PipelineContext
    vad: VADStage
    asr: ASRStage
    llm: LLMStage
    chunker: ChunkerStage
    tts: TTSStage
    playback: PlaybackStage
    tools: ToolStage  # beside the chain: the controller sends it calls
    controller: TurnController
    watchdog: Watchdog

    @property
    def stages(self) -> list[Stage]:
        """The chain, in order."""
        return [self.vad, self.asr, self.llm, self.chunker, self.tts, self.playback]

    @property
    def bus(self) -> EventBus:
        return self.ctx.bus

    @property
    def conversation(self) -> Conversation:
        return self.controller.conversation

    async def run(
        self, source: AsyncIterator[AudioFrame], preprocess: Callable[[AudioFrame], AudioFrame] | None = None
    ) -> None:
        """Feed the source through the stages; return when every turn is done."""

        async def feed() -> None:
            try:
                async for frame in source:
                    if preprocess is not None:
                        frame = preprocess(frame)
                    await self.vad.inbox.put(frame)
            finally:
                await self.vad.inbox.put(END)

        async def chain() -> None:
            try:
                await run_stages(self.stages)
            finally:
                self.tools.inbox.put_nowait(END)  # nothing calls once the chain is done

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(chain(), name="stages")
                group.create_task(self.tools.run(), name="stage:tools")
                group.create_task(feed(), name="feed")
        finally:
            self.watchdog.close()


def build_pipeline(
    components: Components,
    settings: PipelineSettings,
    output: AudioOutput,
    session_id: str,
    bus: EventBus | None = None,
) -> Pipeline:
    """Wire a session's stages, turn controller and budget watchdog."""
    bus = bus or EventBus()
    ctx = PipelineContext(bus=bus, turns=TurnRegistry(bus))
    count_tokens = components.llm.count_tokens
    conversation = Conversation(settings.history.system_prompt, settings.history.budget_tokens, count_tokens)
    vad = VADStage(ctx, settings.vad, classifier=components.classifier, silero=components.silero)
    asr = ASRStage(
        ctx,
        components.transcriber,
        components.asr_executor,
        sample_rate=settings.asr.sample_rate,
        partial_interval_ms=settings.asr.partial_interval_ms,
        min_partial_audio_ms=settings.asr.min_partial_audio_ms,
        turn_scorer=components.turn_scorer,
        scorer_executor=components.turn_executor,
    )
    llm = LLMStage(ctx, components.llm, conversation, session_id, error_reply=settings.error_reply)
    c = settings.chunker
    chunker = ChunkerStage(
        ctx,
        first_min_words=c.first_min_words,
        first_max_words=c.first_max_words,
        min_words=c.min_words,
        max_words=c.max_words,
    )
    tts = TTSStage(ctx, components.synthesizer, components.tts_executor, settings.output_rate)
    playback = PlaybackStage(ctx, output)
    tools = ToolStage(ctx, components.toolbox)
    controller = TurnController(
        ctx, conversation, settings.turns, Stages(vad=vad, asr=asr, llm=llm, playback=playback, tools=tools),
        components.phrase,
    )
    playback.gate = controller
    llm.steps_pending = controller.steps_pending
    observe = getattr(output, "observe", None)
    if observe is not None:
        bus.subscribe(observe)
    pipeline = Pipeline(
        ctx=ctx,
        vad=vad,
        asr=asr,
        llm=llm,
        chunker=chunker,
        tts=tts,
        playback=playback,
        tools=tools,
        controller=controller,
        watchdog=Watchdog(bus, list(settings.budgets)),
    )
    connect(ctx, pipeline.stages)
    ctx.turns.attach(tools.inbox, reply=True)
    return pipeline
