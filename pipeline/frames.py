"""The typed frames and events that flow between the pipeline's stages.

Two kinds of object travel through the pipeline:

* **Frames** carry media (audio in, audio out). Every audio frame carries the
  monotonic time at which its last sample was captured (input) or produced
  (output), so latency is computed from stamps, never from guesses.
* **Events** say that something happened (speech started, a transcript is
  final, the first token arrived...). Every event carries the monotonic time
  it was produced (``at``) and the turn it belongs to. Events are known by
  their class; what a websocket client calls them (and which it sees at
  all) is each face's business (``assistant/server/``: ``v1/codec.py``, ``realtime/state.py``).

A *turn* is one user utterance plus the assistant's reply to it; its id is
assigned by the VAD when speech opens, and every frame or event that belongs
to it carries that id so that cancelling a turn can drop exactly its work.

:class:`AudioFrame` and :func:`now` (the one clock) belong to the audio layer
below (:mod:`audio.frame`) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from audio.frame import AudioFrame, now

__all__ = [
    "AudioFrame",
    "Event",
    "SpeechStarted",
    "SpeechPaused",
    "SpeechResumed",
    "SpeechStopped",
    "TranscriptPartial",
    "TurnEndScored",
    "TranscriptFinal",
    "TranscriptEmpty",
    "ReplyRequest",
    "TranscribeRequest",
    "ToolSpec",
    "ToolChoice",
    "NO_TOOLS",
    "ToolCall",
    "ToolRequest",
    "BufferTranscribed",
    "LLMToken",
    "LLMDone",
    "ToolCallDelta",
    "ToolCalled",
    "ToolResult",
    "TextChunk",
    "TTSAudio",
    "TTSFirstAudio",
    "TTSDone",
    "ReplyAudioStarted",
    "ReplyAudioEnded",
    "TurnCancelled",
    "ReplyCancelled",
    "ReplyInterrupted",
    "TurnCompleted",
    "BudgetExceeded",
    "StageError",
    "EndOfStream",
    "END",
    "now",
]


# --------------------------------------------------------------------------
# Function calls: what a reply request offers and a reply makes (pipeline/tools.py)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call: its name, what it does, its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    # Words that mark a question this tool answers (``tools.preselect``):
    # a deterministic choice for a model that cannot choose by itself.
    keywords: tuple[str, ...] = ()

    def openai(self) -> dict[str, Any]:
        """As the chat completions API (and chat templates) take it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": dict(self.parameters)}}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """How the model must choose: ``mode`` auto | none | required | named (``name``)."""

    mode: str = "auto"
    name: str | None = None

    @classmethod
    def of(cls, value: Any) -> ToolChoice:
        """From OpenAI's forms: ``"auto"``, ``"none"``, ``"required"``,
        ``{"type": "function", "name": ...}`` (Realtime) or
        ``{"type": "function", "function": {"name": ...}}`` (chat)."""
        if isinstance(value, ToolChoice):
            return value
        if value in ("auto", "none", "required"):
            return cls(value)
        if isinstance(value, Mapping) and value.get("type") == "function":
            name = value.get("name") or (value.get("function") or {}).get("name")
            if isinstance(name, str) and name:
                return cls("named", name)
        raise ValueError('tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}')

    @property
    def forced(self) -> bool:
        """The model must call (a tool it names, or one of them)."""
        return self.mode in ("required", "named")

    def openai(self) -> Any:
        if self.mode == "named":
            return {"type": "function", "function": {"name": self.name}}
        return self.mode


NO_TOOLS = ToolChoice("none")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model made: ``arguments`` is the JSON text it wrote."""

    call_id: str
    name: str
    arguments: str

    def openai(self) -> dict[str, Any]:
        return {"id": self.call_id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


# --------------------------------------------------------------------------
# Media frames (AudioFrame itself lives in the audio layer)
# --------------------------------------------------------------------------


@dataclass(slots=True)
class TTSAudio:
    """Synthesized reply audio on its way to the output, already resampled."""

    turn_id: int
    pcm: np.ndarray  # int16
    sample_rate: int
    chunk_index: int
    at: float = field(default_factory=now)


@dataclass(slots=True)
class ReplyRequest:
    """A command from the turn controller to the language model stage:
    answer this turn (the prompt is read from the conversation history when
    the stage starts on it, so it includes the replies written before)."""

    turn_id: int
    text: str
    # The tools the model may call in this reply, and how it must choose
    # (pipeline/tools.py); none: a plain answer.
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None
    # Say exactly this instead of asking the model (an apology after a
    # failed call; "" ends a reply whose calls the client runs).
    say: str | None = None


@dataclass(slots=True)
class ToolRequest:
    """A command from the turn controller to the tool stage: run this call."""

    turn_id: int
    call: ToolCall


@dataclass(slots=True)
class TranscribeRequest:
    """A command from the turn controller to the speech recognition stage:
    transcribe this whole buffer (a client that ends its turns itself
    committed it; no VAD saw it)."""

    turn_id: int
    pcm: np.ndarray  # int16 at the pipeline's input rate


# --------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Event:
    """Something that happened, stamped with when it happened."""

    turn_id: int | None
    at: float = field(default_factory=now)


@dataclass(slots=True, kw_only=True)
class SpeechStarted(Event):
    """The VAD confirmed speech. ``onset_at`` is the first voiced frame's stamp.

    ``barge_in``: it was confirmed while the assistant was speaking (under
    the stricter barge-in thresholds), so it interrupts the reply.

    ``preroll`` holds the frames captured just before the onset so the first
    syllable reaches speech recognition.
    """

    onset_at: float
    onset_position: int
    preroll: list[AudioFrame] = field(default_factory=list)
    barge_in: bool = False  # opened while the assistant was speaking


@dataclass(slots=True, kw_only=True)
class SpeechPaused(Event):
    """Voice stopped a moment ago; the turn may be ending.

    Sent well before :class:`SpeechStopped` so recognition can start decoding
    the complete utterance while the silence hangover is still running.
    """

    last_voiced_at: float


@dataclass(slots=True, kw_only=True)
class SpeechResumed(Event):
    """Voice came back before the hangover closed the turn."""


@dataclass(slots=True, kw_only=True)
class SpeechStopped(Event):
    """The silence hangover elapsed: the user's turn is over.

    ``last_voiced_at`` is the capture stamp of the last voiced frame; voice to
    voice latency is measured from it.
    """

    last_voiced_at: float
    last_voiced_position: int


@dataclass(slots=True, kw_only=True)
class TranscriptPartial(Event):
    """A transcript of the speech so far. ``stable`` will not change."""

    stable: str
    unstable: str
    # The decode heard everything up to the pause the user is in: the turn
    # controller reads these words for endpointing and an early reply.
    covers_pause: bool = False

    @property
    def text(self) -> str:
        return f"{self.stable} {self.unstable}".strip()


@dataclass(slots=True, kw_only=True)
class TurnEndScored(Event):
    """The semantic end-of-turn model's opinion of the user's voice at a pause
    (pipeline/turns/semantic.py): P(the turn is complete)."""

    probability: float
    audio_end_at: float  # capture stamp of the last frame it heard


@dataclass(slots=True, kw_only=True)
class TranscriptFinal(Event):
    """The transcript of the whole utterance.

    ``reused`` tells whether it came from a decode that was already running
    or finished when speech stopped (no extra work after the user stopped);
    ``forced`` that the ASR budget ran out and the latest partial was used.
    ``speculative`` finals are sent at a pause, while the silence hangover
    still runs, so the reply can start early; its audio is held until the
    turn really ends, and it is thrown away (:class:`ReplyCancelled`) if the
    user goes on speaking. The confirming final follows at the end of the
    turn on the bus only.
    """

    text: str
    reused: bool = False
    forced: bool = False  # committed early by the ASR budget's policy
    speculative: bool = False  # sent at the pause, before the turn ended
    decode_ms: float = 0.0


@dataclass(slots=True, kw_only=True)
class BufferTranscribed(Event):
    """The words of a committed buffer (:class:`TranscribeRequest`); empty when none were heard."""

    text: str
    audio_s: float


@dataclass(slots=True, kw_only=True)
class TranscriptEmpty(Event):
    """Recognition heard no words in the turn (a cough, a knock, noise)."""


@dataclass(slots=True, kw_only=True)
class LLMToken(Event):
    """A piece of the reply text as the language model streams it."""

    text: str
    index: int


@dataclass(slots=True, kw_only=True)
class LLMDone(Event):
    """The language model finished its reply (or stopped at its limit)."""

    text: str
    tokens: int
    finish_reason: str | None


@dataclass(slots=True, kw_only=True)
class ToolCallDelta(Event):
    """A piece of a call's arguments as the model writes them (the first names the tool)."""

    call_id: str
    name: str
    delta: str


@dataclass(slots=True, kw_only=True)
class ToolCalled(Event):
    """The model's reply ended in calls (after ``text``, said before them, if any)."""

    calls: tuple[ToolCall, ...]
    text: str = ""


@dataclass(slots=True, kw_only=True)
class ToolResult(Event):
    """A call this process ran came back: ``output``, or ``error`` (failed, timed out, unusable)."""

    call_id: str
    name: str
    output: str
    error: str | None = None
    elapsed_ms: float = 0.0


@dataclass(slots=True, kw_only=True)
class TextChunk(Event):
    """A speakable piece of the reply, cleaned of markdown, emoji and URLs."""

    text: str
    index: int
    last: bool = False


@dataclass(slots=True, kw_only=True)
class TTSFirstAudio(Event):
    """The synthesizer produced the turn's first audio."""

    chunk_index: int


@dataclass(slots=True, kw_only=True)
class TTSDone(Event):
    """Synthesis of the turn's reply is complete."""

    chunks: int


@dataclass(slots=True, kw_only=True)
class ReplyAudioStarted(Event):
    """The first sample of the reply reached the output (speaker or file).

    ``at`` is when it was handed to the output device; ``position`` is where
    it lies on the output timeline in samples at ``sample_rate``.
    """

    position: int
    sample_rate: int


@dataclass(slots=True, kw_only=True)
class ReplyAudioEnded(Event):
    """The last sample of the reply was played."""

    samples: int


@dataclass(slots=True, kw_only=True)
class TurnCancelled(Event):
    """The turn was cancelled as a whole; its pending work was dropped."""

    reason: str


@dataclass(slots=True, kw_only=True)
class ReplyCancelled(Event):
    """The reply being prepared was thrown away; the user's turn goes on."""

    reason: str


@dataclass(slots=True, kw_only=True)
class ReplyInterrupted(Event):
    """The user spoke over the reply (barge-in) and it was stopped there.

    ``heard_text`` is the part of the reply the user heard, cut at the
    played position (``played_samples`` at ``sample_rate``); the history
    keeps only that, marked interrupted. ``onset_at`` is the capture stamp of
    the interrupting speech's first voiced frame and ``stopped_at`` when the
    last reply sample played: ``stop_ms`` is the barge-in stop time.
    ``by_turn`` is the new user turn the interruption opened.
    """

    heard_text: str
    played_samples: int
    sample_rate: int
    onset_at: float
    stopped_at: float
    by_turn: int | None = None

    @property
    def stop_ms(self) -> float:
        return max(0.0, (self.stopped_at - self.onset_at) * 1000)


@dataclass(slots=True, kw_only=True)
class TurnCompleted(Event):
    """Every stage finished the turn. The report builder closes it."""


@dataclass(slots=True, kw_only=True)
class BudgetExceeded(Event):
    """A stage's time budget ran out while the turn was still waiting on it.

    Sent by the watchdog at the deadline itself, not after the fact;
    ``elapsed_ms`` is measured when the timer fired.
    """

    stage: str
    budget_ms: float
    elapsed_ms: float
    policy: str


@dataclass(slots=True, kw_only=True)
class StageError(Event):
    """A stage failed on one turn; the session goes on."""

    stage: str
    message: str


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """Sent once through every channel when the input ends."""

    reason: Literal["input-ended", "stopped"] = "input-ended"


END = EndOfStream()

Frame = AudioFrame | TTSAudio | ReplyRequest | TranscribeRequest | ToolRequest | Event | EndOfStream
