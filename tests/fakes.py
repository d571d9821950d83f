"""Stand-ins for the models and the shared test set-up (plumbing tests only;
every capability also has a test with the real models)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np

from pipeline.frames import Event
from pipeline.runtime import EventBus, PipelineContext, TurnRegistry


def context() -> tuple[PipelineContext, list[Event]]:
    """A pipeline context and the list of every event published on its bus."""
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    return PipelineContext(bus=bus, turns=TurnRegistry(bus)), events


class FakeTranscriber:
    """Says how much audio it heard."""

    def __call__(self, audio: np.ndarray) -> str:
        return f"heard {round(len(audio) / 16000, 1)} seconds"


class FakeLLM:
    """Streams a fixed answer word by word; remembers live and aborted requests."""

    def __init__(self) -> None:
        self.live: set[str] = set()
        self.aborted: list[str] = []
        self.prompts: list[list[dict[str, str]]] = []

    async def stream(
        self, messages: list[dict[str, str]], request_id: str, session_id: str = ""
    ) -> AsyncIterator[tuple[str, str | None]]:
        self.prompts.append(messages)
        self.live.add(request_id)
        try:
            for word in ["You", " said", " it,", " and", " here", " is", " my", " answer."]:
                await asyncio.sleep(0.02)
                yield word, None
            yield "", "stop"
        finally:
            self.live.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def count_tokens(self, text: str) -> int:
        return len(text.split())


class FakeVoice:
    """A tenth of a second of a constant tone per chunk."""

    sample_rate = 16000

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        yield np.full(1600, 1000, np.int16)


class ScriptedClassifier:
    """webrtcvad stand-in: a frame is voiced when it is loud enough to matter."""

    def is_speech(self, pcm: bytes, sample_rate: int) -> bool:
        return bool(np.abs(np.frombuffer(pcm, np.int16)).max() > 30)


class FakeSession:
    """The session's verbs a face uses (assistant.server.face.SessionVerbs), recorded."""

    id = "s1"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.turns = 0
        self.held_ms = 0.0
        self.playing_turns: set[int] = set()
        self.history: dict[tuple[int, str], str] = {}
        self.input_ended = False

    def _turn(self) -> int:
        self.turns += 1
        return self.turns

    def feed(self, pcm: np.ndarray, arrived: float | None = None) -> None:
        self.calls.append(("feed", len(pcm)))

    def end_input(self) -> None:
        self.calls.append(("end_input",))

    def hold_input(self, held: bool) -> None:
        self.calls.append(("hold_input", held))

    def commit_input(self, min_ms: float = 0.0) -> int | None:
        self.calls.append(("commit_input",))
        return self._turn() if self.held_ms >= min_ms else None

    def clear_input(self) -> None:
        self.calls.append(("clear_input",))

    def open_turn(self) -> int:
        return self._turn()

    def add_message(self, role: str, text: str) -> int:
        turn = self._turn()
        self.history[(turn, role)] = text
        self.calls.append(("add_message", role, text))
        return turn

    def remove_message(self, turn_id: int, role: str) -> bool:
        self.calls.append(("remove_message", turn_id, role))
        return self.history.pop((turn_id, role), None) is not None

    def message(self, turn_id: int, role: str) -> str | None:
        return self.history.get((turn_id, role))

    def truncate(self, turn_id: int, heard: str) -> bool:
        self.calls.append(("truncate", turn_id, heard))
        return True

    def respond(self, tools: Any = None, choice: Any = None) -> int:
        turn = self._turn()
        self.calls.append(("respond", turn) if tools is None and choice is None else ("respond", turn, tools, choice))
        return turn

    def set_tools(self, tools: Any, choice: Any = None) -> None:
        self.calls.append(("set_tools", tuple(t.name for t in tools), choice))

    def add_call(self, call: Any) -> int:
        self.calls.append(("add_call", call.call_id, call.name))
        return self._turn()

    def add_result(self, call_id: str, output: str) -> int:
        self.calls.append(("add_result", call_id, output))
        return self._turn()

    def stop_reply(self, turn_id: int, reason: str) -> None:
        self.calls.append(("stop_reply", turn_id))

    def playing(self, turn_id: int) -> bool:
        return turn_id in self.playing_turns

    def played(self, turn_id: int, samples: int) -> None:
        self.calls.append(("played", turn_id, samples))

    def set_instructions(self, text: str | None) -> None:
        self.calls.append(("set_instructions", text))

    def cancel_turn(self, turn_id: int, reason: str = "cancelled") -> bool:
        self.calls.append(("cancel_turn", turn_id))
        return True


class FakeLink:
    """What a face asks of its connection (assistant.server.face.Link), recorded."""

    def __init__(self) -> None:
        self.fed: list[bytes] = []
        self.ended: list[str] = []
        self.figures: list[tuple[int, float]] = []

    def feed(self, pcm16: bytes) -> None:
        self.fed.append(pcm16)

    def end(self, reason: str) -> None:
        self.ended.append(reason)

    def heard(self, turn_id: int, voice_to_voice_ms: float) -> None:
        self.figures.append((turn_id, voice_to_voice_ms))


class FakeToolLLM(FakeLLM):
    """Calls the tool it is made to (a forced ``tool_choice``) with a city, in two
    pieces; otherwise answers from the last tool result in its prompt, if any."""

    def __init__(self, city: str = "Paris") -> None:
        super().__init__()
        self.city = city
        self.choices: list[Any] = []

    async def stream(  # type: ignore[override]
        self, messages: list[dict[str, Any]], request_id: str, session_id: str = "", tools: Any = (),
        tool_choice: Any = None,
    ) -> AsyncIterator[Any]:
        from pipeline.llm import CallPiece

        self.prompts.append(messages)
        self.choices.append(tool_choice if tools else None)  # None: no tools offered
        self.live.add(request_id)
        try:
            if tools and tool_choice is not None and tool_choice.forced:
                await asyncio.sleep(0.02)
                yield CallPiece(0, '{"city": ', "call_1", tools[0].name)
                await asyncio.sleep(0.02)
                yield CallPiece(0, f'"{self.city}"}}')
                yield "", "tool_calls"
                return
            results = [m["content"] for m in messages if m["role"] == "tool"]
            words = f"It says: {results[-1]}" if results else "You said it, and here is my answer."
            for word in words.split():
                await asyncio.sleep(0.02)
                yield word + " ", None
            yield "", "stop"
        finally:
            self.live.discard(request_id)


class FakeToolbox:
    """One weather tool that answers, fails, hangs or returns garbage, as told."""

    def __init__(self, behaviour: str = "answer", timeout_s: float = 5.0) -> None:
        from pipeline.tools import ToolSpec

        self.behaviour = behaviour
        self._timeout_s = timeout_s
        self.calls: list[dict[str, Any]] = []
        self.cancelled = 0
        self.specs = [ToolSpec("get_weather", "Current weather for a city.",
                               {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                               keywords=("weather", "rain"))]

    def timeout_s(self, name: str) -> float:
        return self._timeout_s

    async def call(self, name: str, arguments: dict[str, Any]) -> Any:
        self.calls.append(arguments)
        if self.behaviour == "fail":
            raise RuntimeError("the weather service answered 503")
        if self.behaviour == "garbage":
            return {"not": "text"}
        if self.behaviour == "hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return f"Sunny and 18 degrees in {arguments.get('city')}."
