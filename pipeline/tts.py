"""Incremental speech synthesis with piper, chunk by chunk.

Each :class:`TextChunk` is synthesized as soon as it arrives, while the
language model is still generating the rest of the reply, and its audio goes
downstream sentence by sentence as piper produces it, resampled to the
output rate. The resampler is kept per turn so the joins between chunks are
seamless. A chunk with ``last=True`` ends the turn's reply
(:class:`TTSDone`); its text may be empty, meaning "end only".
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor
from typing import Any, Protocol

import numpy as np

from audio.resample import Resampler

from .frames import ReplyCancelled, TextChunk, TTSAudio, TTSDone, TTSFirstAudio, TurnCancelled
from .runtime import RECENT_TIMINGS, PipelineContext, Stage, iterate_blocking



class Synthesizer(Protocol):
    """Blocking text-to-speech: yields int16 mono audio at ``sample_rate``."""

    sample_rate: int

    def synthesize(self, text: str) -> Iterator[np.ndarray]: ...


class PiperSynthesizer:
    """A loaded :class:`piper.PiperVoice` with this assistant's settings."""

    def __init__(self, voice: Any, length_scale: float = 1.0) -> None:
        from piper import SynthesisConfig

        self.voice = voice
        self.sample_rate = int(voice.config.sample_rate)
        self._config = SynthesisConfig(length_scale=length_scale)

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        for chunk in self.voice.synthesize(text, self._config):
            yield chunk.audio_int16_array


class TTSStage(Stage):
    """Speaks each chunk of the reply as soon as it is ready."""

    name = "tts"
    scope = "reply"
    # How much later than a first chunk a later one is due (its turn has the
    # audio before it to play meanwhile).
    later_chunk_slack_s = 1.0

    def __init__(
        self,
        ctx: PipelineContext,
        synthesizer: Synthesizer,
        executor: Executor | None,
        output_rate: int,
    ) -> None:
        super().__init__(ctx)
        self._synth = synthesizer
        self._executor = executor
        self._rate = output_rate
        self._resamplers: dict[int, Resampler] = {}
        self._chunks: dict[int, int] = {}
        self.first_audio_ms: deque[float] = deque(maxlen=RECENT_TIMINGS)  # recent: see ASRStage.decode_ms
        ctx.bus.subscribe(self._forget_cancelled)

    def _forget_cancelled(self, event: Any) -> None:
        if isinstance(event, (TurnCancelled, ReplyCancelled)) and event.turn_id is not None:
            self._resamplers.pop(event.turn_id, None)
            self._chunks.pop(event.turn_id, None)

    async def handle(self, item: Any) -> None:
        if not isinstance(item, TextChunk):
            await self.send(item)
            return
        turn_id = item.turn_id
        assert turn_id is not None
        resampler = self._resamplers.get(turn_id)
        if resampler is None:
            resampler = self._resamplers[turn_id] = Resampler(self._synth.sample_rate, self._rate)
        if item.text.strip():
            started = time.perf_counter()
            first = True
            # A shared piper (DeadlineExecutor) speaks first chunks first: a
            # later chunk of another turn has the audio before it to play.
            deadline = item.at if item.index == 0 else item.at + self.later_chunk_slack_s
            async for pcm in iterate_blocking(self._executor, lambda: self._synth.synthesize(item.text), deadline):
                if first:
                    self.first_audio_ms.append((time.perf_counter() - started) * 1000)
                    first = False
                    if turn_id not in self._chunks:
                        self.publish(TTSFirstAudio(turn_id=turn_id, chunk_index=item.index))
                out = resampler.process(pcm)
                if len(out):
                    await self.send(TTSAudio(turn_id=turn_id, pcm=out, sample_rate=self._rate, chunk_index=item.index))
            self._chunks[turn_id] = self._chunks.get(turn_id, 0) + 1
        if item.last:
            tail = resampler.flush()
            if len(tail):
                await self.send(TTSAudio(turn_id=turn_id, pcm=tail, sample_rate=self._rate, chunk_index=item.index))
            del self._resamplers[turn_id]
            await self.send(TTSDone(turn_id=turn_id, chunks=self._chunks.pop(turn_id, 0)))
