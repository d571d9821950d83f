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

    def respond(self) -> int:
        turn = self._turn()
        self.calls.append(("respond", turn))
        return turn

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
