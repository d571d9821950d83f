"""One conversation: a pipeline of stages over the shared models, and the verbs a face may use.

A :class:`Session` owns everything per-conversation (the pipeline built by
:func:`pipeline.builder.build_pipeline` from :mod:`assistant.components`,
with its turn controller and history, the report) and borrows the models
from :class:`~assistant.models.Models`. Audio comes either from an async
iterator of :class:`~pipeline.frames.AudioFrame` (a file at real-time pace,
a microphone) given to :meth:`Session.run`, or from a client through
:meth:`Session.feed`; reply audio goes to an
:class:`~pipeline.playback.AudioOutput`.

A face (a wire protocol, :mod:`assistant.server`) talks to a conversation
only through the verbs below, never to a stage or the turn controller:
feed and end input, hold it for a manual turn and commit or clear that,
add, remove, read and truncate a message, respond, stop a reply, report
what the client played, set the instructions, declare the client's tools
and hand back a call's result. Each verb is one call into
the controller (where every rule about turns lives) or the input; none
waits.

:class:`~pipeline.report.TurnReport` turns the bus events into the per-turn
milestones and latencies written to REPORT.json.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import numpy as np

from audio.framing import StreamFramer
from audio.resample import Resampler
from pipeline.asr import ASRStage
from pipeline.builder import build_pipeline
from pipeline.frames import AudioFrame, now
from pipeline.playback import AudioOutput, PlaybackStage
from pipeline.report import TurnReport
from pipeline.runtime import Channel, EventBus, PipelineContext, Stage, Watchdog
from pipeline.tools import ToolCall, ToolChoice, ToolSpec
from pipeline.tts import TTSStage
from pipeline.turns import Conversation, TurnController

from .components import components_of, pipeline_settings
from .config import Config
from .models import Models

if TYPE_CHECKING:
    from audio.echo import EchoCanceller

log = logging.getLogger("assistant.session")

_session_ids = itertools.count(1)

LIVE_TURNS_KEPT: Final = 100
"""Closed turns a long-lived session's report holds (a kiosk runs for weeks)."""

INPUT_QUEUE_FRAMES: Final = 500
"""Fed audio waiting for the VAD: 10 s of 20 ms frames; the oldest are dropped beyond."""


# --------------------------------------------------------------------------
# Fed input
# --------------------------------------------------------------------------


class _End:
    """The input's end marker in its queue."""


_END: Final = _End()


class FedInput:
    """Audio a client feeds: resampled to the pipeline's rate once, then cut into
    numbered frames for the VAD, or held whole while the client ends its turns
    itself (a manual turn, committed as one buffer).

    Each frame is stamped with the arrival of the data that completed it: for a
    client that is the capture time as this process sees it.
    """

    def __init__(self, rate: int, pipeline_rate: int, frame_ms: int) -> None:
        self.rate = rate
        self.pipeline_rate = pipeline_rate
        self._resampler = Resampler(rate, pipeline_rate)
        self._framer = StreamFramer(pipeline_rate, frame_ms)
        self._queue: Channel[AudioFrame | _End] = Channel("session.input", maxsize=INPUT_QUEUE_FRAMES)
        self._held: list[np.ndarray] | None = None  # None: fed audio goes to the VAD
        self.ended = False

    def feed(self, pcm: np.ndarray, arrived: float) -> None:
        if self.ended:
            return
        out = self._resampler.process(pcm)
        if self._held is not None:
            self._held.append(out)
        else:
            self._frame(out, arrived)

    def _frame(self, pcm: np.ndarray, arrived: float) -> None:
        for frame in self._framer.push(pcm, arrived):
            self._queue.put_nowait(frame)

    def end(self) -> None:
        """No more audio: the last partial frame is padded and the frames end."""
        if self.ended:
            return
        self.ended = True
        at = now()
        if self._held is None:
            self._frame(self._resampler.flush(), at)
        for frame in self._framer.end(at):
            self._queue.put_nowait(frame)
        self._queue.put_nowait(_END)

    async def frames(self) -> AsyncIterator[AudioFrame]:
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                return
            yield item

    @property
    def holding(self) -> bool:
        return self._held is not None

    def hold(self, held: bool) -> None:
        """Hold fed audio for a commit (True), or frame it for the VAD again (False); either way what is held goes."""
        self._held = [] if held else None

    def take(self) -> np.ndarray:
        """What is held, whole (the resampler's tail included); the buffer starts again empty."""
        if self._held is None:
            return np.zeros(0, np.int16)
        self._held.append(self._resampler.flush())
        pcm = np.concatenate(self._held) if self._held else np.zeros(0, np.int16)
        self._held = []
        return pcm

    def clear(self) -> None:
        if self._held is not None:
            self._held = []
        self._resampler.reset()


# --------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------


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
        input_rate: int | None = None,
    ) -> None:
        """``keep_turns``: how many closed turns the report holds (None: all,
        for a file's report; live runs bound it, see TurnReport).
        ``input_rate``: the rate of audio given to :meth:`feed` (None: the pipeline's)."""
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
        self.input = FedInput(input_rate or config.audio.input_rate, config.audio.input_rate, config.audio.frame_ms)
        self.origin = now()
        self.report = TurnReport(
            self.bus, self.origin, config.audio.output_rate, self.watchdog, keep=keep_turns,
            input_rate=config.audio.input_rate,
        )

    # ---- the parts, for the programs that run a session in-process --------

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

    @property
    def busy(self) -> bool:
        """Someone is speaking or a turn is open (a kiosk does not sleep then)."""
        return self.pipeline.vad.in_speech or not self.controller.idle

    async def run(self, source: AsyncIterator[AudioFrame] | None = None) -> None:
        """Feed the source (None: what :meth:`feed` gives) through the pipeline;
        return when every turn is done."""
        canceller = self.echo_canceller
        frames = source if source is not None else self.input.frames()
        await self.pipeline.run(frames, preprocess=canceller.process if canceller is not None else None)

    # ---- verbs: input ------------------------------------------------------

    def feed(self, pcm: np.ndarray, arrived: float | None = None) -> None:
        """PCM16 from a client at the session's input rate, ``arrived`` when it came."""
        self.input.feed(pcm, now() if arrived is None else arrived)

    def end_input(self) -> None:
        """No more audio will be fed: turns under way finish, then :meth:`run` returns."""
        self.input.end()

    @property
    def input_ended(self) -> bool:
        return self.input.ended

    def hold_input(self, held: bool) -> None:
        """True: the client ends its turns itself, fed audio is held for :meth:`commit_input`
        (no VAD hears it); False: the VAD hears it again. What was held is dropped."""
        self.input.hold(held)

    def commit_input(self, min_ms: float = 0.0) -> int | None:
        """The held audio becomes the user's turn (its words reach the history when
        recognition has them); its turn id, or None when it held less than ``min_ms``."""
        pcm = self.input.take()
        if len(pcm) * 1000 < min_ms * self.input.pipeline_rate:
            return None
        turn_id = self.open_turn()
        self.controller.transcribe(turn_id, pcm)
        return turn_id

    def clear_input(self) -> None:
        """Drop the held audio."""
        self.input.clear()

    # ---- verbs: the conversation ------------------------------------------

    def open_turn(self) -> int:
        """A turn with no speech of its own (a text message, a reply asked for)."""
        return self.ctx.turns.new().id

    def add_message(self, role: str, text: str) -> int:
        """A message the client puts into the history itself, settled at once; its turn id."""
        turn_id = self.open_turn()
        if role == "user":
            self.controller.add_message(turn_id, user=text)
        else:
            self.controller.add_message(turn_id, reply=text)
        return turn_id

    def remove_message(self, turn_id: int, role: str) -> bool:
        return self.controller.remove_message(turn_id, role)

    def message(self, turn_id: int, role: str) -> str | None:
        """What the history holds now of one side of a turn (None: nothing)."""
        return self.conversation.said(turn_id, role)

    def truncate(self, turn_id: int, heard: str) -> bool:
        """The client played only ``heard`` of a settled reply: the history keeps that."""
        return self.controller.truncate(turn_id, heard)

    def respond(self, tools: tuple[ToolSpec, ...] | None = None, choice: ToolChoice | None = None) -> int:
        """A reply to what the history holds now (after the words of any buffer
        committed before); its turn id. It plays as soon as the floor is free.
        ``tools`` / ``choice``: the client's tools and choice for this reply only."""
        turn_id = self.open_turn()
        self.controller.respond(turn_id, tools, choice)
        return turn_id

    def set_tools(self, tools: tuple[ToolSpec, ...], choice: ToolChoice | None = None) -> None:
        """The client's own tools from now on (it runs their calls), beside the process's."""
        self.controller.set_tools(tools, choice)

    def add_call(self, call: ToolCall) -> int:
        """A function call the client puts into the history itself; its turn id."""
        turn_id = self.open_turn()
        self.controller.add_call(turn_id, call)
        return turn_id

    def add_result(self, call_id: str, output: str) -> int:
        """The result of a call the client ran, with the call in the history; its turn id."""
        turn_id = self.open_turn()
        self.controller.add_result(turn_id, call_id, output)
        return turn_id

    def stop_reply(self, turn_id: int, reason: str) -> None:
        """Stop the turn's reply now; the history keeps what was played of it."""
        self.controller.stop_reply(turn_id, reason)

    def playing(self, turn_id: int) -> bool:
        """Whether the turn's reply has begun to play."""
        return self.playback.has_started(turn_id)

    def played(self, turn_id: int, samples: int) -> None:
        """The client has played ``samples`` of the turn's reply (at its own rate):
        a barge-in then cuts the history where it really was."""
        report = getattr(self.output, "report_position", None)
        if report is not None:
            report(turn_id, samples)

    def set_instructions(self, text: str | None) -> None:
        """The system prompt of every reply from now on (None: the configured one)."""
        self.controller.set_instructions(text or self.config.llm.system_prompt)

    def cancel_turn(self, turn_id: int, reason: str = "cancelled") -> bool:
        return self.ctx.cancel_turn(turn_id, reason)
