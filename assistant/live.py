"""Live audio for ``voice-assistant mic``: microphone frames in, speaker out.

The device callbacks run on PortAudio's threads; this module hops their data
onto the event loop (``call_soon_threadsafe``) and never blocks them: if the
pipeline falls behind, the oldest microphone frames are dropped (counted in
``overflows``) rather than stalling the capture.

A kiosk runs for weeks: :meth:`LiveAudio.supervise` notices a microphone
that stopped delivering (unplugged, PulseAudio restarted), logs it, reopens
both devices with backoff until frames flow again, and never ends the
process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from audio.devices import Microphone, Speaker
from audio.errors import DeviceError
from pipeline.frames import AudioFrame
from pipeline.runtime import Channel

from .config import Config

log = logging.getLogger("assistant.live")

STALL_S = 2.0  # no microphone frame for this long: the device is lost
_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


def echo_canceller(config: Config) -> Any:
    """The canceller a loudspeaker and a microphone in one room need
    (``echo.cancel`` auto or on), or None."""
    if config.echo.cancel not in ("auto", "on"):
        return None
    from audio.echo import EchoCanceller

    return EchoCanceller(
        sample_rate=config.audio.input_rate,
        frame_ms=config.audio.frame_ms,
        tail_ms=config.echo.tail_ms,
        delay_ms=config.echo.delay_ms,
    )


def stop_event(max_seconds: float | None) -> asyncio.Event:
    """Set on SIGINT/SIGTERM, or after ``max_seconds``: when a live run ends."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if max_seconds:
        loop.call_later(max_seconds, stop.set)
    return stop


class SpeakerOutput:
    """:class:`pipeline.playback.AudioOutput` over a live :class:`Speaker`."""

    def __init__(self, speaker: Speaker) -> None:
        self.speaker = speaker
        self.sample_rate = speaker.rate
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drained = asyncio.Event()
        self._last_drained = 0.0
        self._first_played: dict[Any, float] = {}
        speaker.on_drained = self._on_drained
        speaker.on_played = self._on_played

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _on_drained(self, tag: object, at: float) -> None:
        self._last_drained = at
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drained.set)

    def _on_played(self, tag: object, offset: int, at: float) -> None:
        self._first_played.setdefault(tag, at)

    def write(self, turn_id: int, pcm: np.ndarray) -> tuple[float, int]:
        pending = self.speaker.pending()
        at = time.monotonic() + pending / self.sample_rate + self.speaker.latency
        position = self.speaker.buffer.position + pending
        self.speaker.write(pcm, tag=turn_id)
        return at, position

    def clear(self, turn_id: int) -> None:
        self.speaker.clear()

    def played(self, turn_id: int) -> tuple[int, float]:
        """Samples of the turn handed to the device; the last of them is
        heard once the device's own buffer has played (its latency)."""
        return self.speaker.buffer.played(turn_id), time.monotonic() + self.speaker.latency

    async def drain(self, turn_id: int) -> float:
        self.speaker.finish()
        while self.speaker.pending() > 0:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), timeout=0.5)
            except TimeoutError:
                pass
        return max(self._last_drained, time.monotonic())


class LiveAudio:
    """A microphone and a speaker, opened together for one conversation."""

    def __init__(
        self, config: Config, input_device: int | None, output_device: int | None, echo_canceller: Any = None
    ) -> None:
        self.config = config
        self.echo_canceller = echo_canceller
        self.frames_in: Channel[AudioFrame] | None = None
        self.last_frame_at = time.monotonic()
        self.last_attempt_at = 0.0  # the supervisor's last reopen attempt
        self.device_open = False
        self.recoveries = 0
        self._position = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.microphone = Microphone(input_device, config.audio.frame_ms, self._on_frame, rate=config.audio.input_rate)
        self.speaker = Speaker(output_device, rate=config.audio.output_rate, frame_ms=config.audio.frame_ms)
        self.output = SpeakerOutput(self.speaker)
        if echo_canceller is not None:
            self.speaker.on_block = self._on_block

    def _on_block(self, block: np.ndarray, rate: int, at: float) -> None:
        """The speaker's output, as the echo canceller's reference (on the loop)."""
        if self._loop is not None and self.echo_canceller is not None:
            self._loop.call_soon_threadsafe(self.echo_canceller.reference, block, rate, at)

    def _on_frame(self, pcm: np.ndarray, captured_at: float) -> None:
        if self._loop is None or self.frames_in is None:
            return
        frame = AudioFrame(pcm=pcm.copy(), sample_rate=self.config.audio.input_rate, captured_at=captured_at)
        self._loop.call_soon_threadsafe(self._push, frame)

    def _push(self, frame: AudioFrame) -> None:
        assert self.frames_in is not None
        frame.position = self._position
        self._position += len(frame.pcm)
        self.last_frame_at = time.monotonic()
        self.device_open = True
        self.frames_in.put_nowait(frame)

    def __enter__(self) -> LiveAudio:
        self._loop = asyncio.get_running_loop()
        self.frames_in = Channel("microphone", maxsize=500)  # 10 s of 20 ms frames
        self.output.bind(self._loop)
        self.speaker.start()
        try:
            self.microphone.start()
        except BaseException:
            self.speaker.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.microphone.stop()
        self.speaker.stop()

    def open_or_recover(self) -> bool:
        """Enter, but a missing device is not fatal: the supervisor retries."""
        try:
            self.__enter__()
            return True
        except DeviceError as exc:
            log.warning("audio devices not available yet (%s); retrying", exc)
            self.device_open = False
            self.last_frame_at = 0.0
            return False

    def alive(self) -> bool:
        """For the watchdog: frames flow, or the supervisor is reviving the
        devices right now (a stream nobody revives is not alive)."""
        now = time.monotonic()
        return now - self.last_frame_at < STALL_S * 2 or now - self.last_attempt_at < 10.0

    async def supervise(self, stop: asyncio.Event) -> None:
        """Reopen the devices whenever the microphone stops delivering."""
        while not stop.is_set():
            await asyncio.sleep(0.5)
            if time.monotonic() - self.last_frame_at < STALL_S:
                continue
            if self.device_open:
                log.warning("microphone lost (no audio for %.1f s); reopening the devices", STALL_S)
            self.device_open = False
            await self._reopen(stop)

    async def _reopen(self, stop: asyncio.Event) -> None:
        """Reopen the microphone until frames flow; every third try also
        rescans the devices (a replugged USB device has a new identity) and
        reopens the speaker. PortAudio's calls block, so they run off the
        event loop, which goes on serving /metrics, /healthz and the watchdog."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while not stop.is_set():
            self.last_attempt_at = time.monotonic()
            try:
                await asyncio.wait_for(loop.run_in_executor(None, self._restart, attempt % 3 == 2), timeout=15)
            except (DeviceError, TimeoutError) as exc:
                log.warning("audio devices still unavailable (%s)", exc or "no answer from the audio system")
            else:
                deadline = time.monotonic() + STALL_S
                while time.monotonic() < deadline and time.monotonic() - self.last_frame_at >= STALL_S:
                    await asyncio.sleep(0.05)
                if time.monotonic() - self.last_frame_at < STALL_S:
                    self.recoveries += 1
                    log.warning("microphone back after %d attempt(s)", attempt + 1)
                    return
            await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
            attempt += 1

    def _restart(self, rescan: bool) -> None:
        self.microphone.stop()
        if rescan:
            self.speaker.stop()
            _rescan_devices()
            self.speaker.start()
        self.microphone.start()

    @property
    def overflows(self) -> int:
        return self.frames_in.overflows if self.frames_in is not None else 0

    async def frames(self, stop: asyncio.Event) -> AsyncIterator[AudioFrame]:
        """Microphone frames until ``stop`` is set."""
        assert self.frames_in is not None
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                getter = asyncio.ensure_future(self.frames_in.get())
                done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
        finally:
            stopper.cancel()



def _rescan_devices() -> None:
    """Make PortAudio list the devices again (a replugged USB microphone, a
    restarted PulseAudio): it enumerates them only when initialized."""
    try:
        import sounddevice

        sounddevice._terminate()
        sounddevice._initialize()
    except Exception as exc:  # PortAudio itself missing: the start will say so
        log.debug("PortAudio re-initialisation failed: %s", exc)
