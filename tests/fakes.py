"""Stand-ins for the models and the shared test set-up (plumbing tests only;
every capability also has a test with the real models)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

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
