"""``voice-assistant kiosk``: a microphone and a loudspeaker, left alone for weeks.

What `mic` does (full duplex, echo cancellation, barge-in), plus:

* **a wake word**: while asleep, microphone frames go to the wake-word
  detector (:mod:`pipeline.wake`) and nowhere else: audio before the wake
  word never reaches speech recognition or the language model. A detection
  says ``kiosk.earcon`` and opens the conversation, which needs no wake word
  until ``kiosk.idle_s`` pass with nobody speaking and nothing playing;
  then it sleeps again. ``kiosk.wake_word: none`` listens always.
* **a greeting at start-up**, which also lets the echo canceller adapt to
  the room before the first barge-in (a fresh AEC3 ducks the user's first
  half second: audio/echo.py);
* **systemd**: ``READY=1`` once the models are loaded and the devices open,
  ``STATUS=`` lines (asleep, awake, devices lost), ``WATCHDOG=1`` only while
  the event loop runs and the microphone delivers or is being revived;
* **lost devices** are reopened with backoff (:meth:`LiveAudio.supervise`),
  never the end of the process; a lost engine is spoken as the error phrase
  (pipeline/llm.py) and retried (assistant/engine/remote.py);
* **metrics and health** on their own port: ``/metrics`` (Prometheus,
  :mod:`assistant.telemetry`) and ``/healthz`` (up, and ready: models
  loaded, engine answering, microphone delivering).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from pipeline.frames import AudioFrame

from .config import Config
from .systemd import Notifier, keep_alive, watchdog_interval
from .telemetry import Telemetry, serve_http

log = logging.getLogger("assistant.kiosk")


class WakeGate:
    """Between the microphone and the session: asleep, frames feed only the
    wake-word detector; awake, they flow on, until the session has been idle
    for ``idle_s``."""

    def __init__(
        self,
        detector: Any | None,
        idle_s: float,
        busy: Callable[[], bool],
        on_wake: Callable[[], None],
        on_sleep: Callable[[], None],
    ) -> None:
        self.detector = detector  # None: no wake word, always awake
        self.idle_s = idle_s
        self.busy = busy
        self.on_wake = on_wake
        self.on_sleep = on_sleep
        self.awake = detector is None
        self.wakes = 0
        self._last_busy = 0.0

    async def frames(self, source: AsyncIterator[AudioFrame]) -> AsyncIterator[AudioFrame]:
        async for frame in source:
            if self.awake:
                if self.busy():
                    self._last_busy = frame.captured_at
                elif self.detector is not None and frame.captured_at - self._last_busy > self.idle_s:
                    self._sleep()
                    continue
                yield frame
            elif self.detector.process(np.asarray(frame.pcm)):
                self._wake(frame.captured_at)

    def _wake(self, at: float) -> None:
        self.awake = True
        self.wakes += 1
        self._last_busy = at  # the idle clock starts at the wake word
        log.info("wake word heard")
        self.on_wake()

    def _sleep(self) -> None:
        self.awake = False
        self.detector.reset()
        log.info("idle for %.0f s: asleep", self.idle_s)
        self.on_sleep()


def spoken(wake_word: str) -> str:
    """okay_nabu -> "okay nabu"."""
    return wake_word.replace("_", " ")


def kiosk(args: argparse.Namespace, config: Config) -> int:
    from audio.devices import resolve_device

    from .models import load_models

    notifier = Notifier()
    notifier.status("loading models")
    in_dev = resolve_device(args.input_device, "input")
    out_dev = resolve_device(args.output_device, "output")
    detector = _load_detector(config)
    models = load_models(config)
    try:
        return asyncio.run(_kiosk(args, config, models, detector, in_dev, out_dev, notifier))
    finally:
        notifier.stopping()
        models.close()


def _load_detector(config: Config) -> Any | None:
    k = config.kiosk
    if k.wake_word == "none":
        return None
    from pipeline.wake import WakeWordDetector, WakeWordSettings

    from .errors import ConfigError

    try:
        return WakeWordDetector(WakeWordSettings(model=k.wake_word, threshold=k.wake_threshold))
    except ValueError as exc:
        raise ConfigError(f"kiosk.wake_word: {exc}") from None


async def _kiosk(
    args: argparse.Namespace, config: Config, models: Any, detector: Any | None, in_dev: Any, out_dev: Any,
    notifier: Notifier,
) -> int:
    from .live import LiveAudio, echo_canceller, stop_event
    from .session import LIVE_TURNS_KEPT, Session

    k = config.kiosk
    await models.warm_up()
    telemetry = Telemetry()
    telemetry.watch_loop(asyncio.get_running_loop())
    telemetry.models_loaded.set(1)
    telemetry.watch_engine(models.llm.health)
    canceller = echo_canceller(config)
    live = LiveAudio(config, in_dev, out_dev, echo_canceller=canceller)
    telemetry.audio_device_open.set_function(lambda: 1.0 if live.device_open else 0.0)
    session = Session(models, config, live.output, echo_canceller=canceller, keep_turns=LIVE_TURNS_KEPT)
    ended = telemetry.observe(session)
    rate = config.audio.output_rate
    wake_phrase = spoken(k.wake_word)

    def busy() -> bool:
        return session.busy

    def on_wake() -> None:
        telemetry.wake_detections.inc()
        live.output.write(0, models.phrase(k.earcon, rate))
        notifier.status("awake: in a conversation")

    def on_sleep() -> None:
        notifier.status(f"asleep: say {wake_phrase}")

    gate = WakeGate(detector, k.idle_s, busy, on_wake, on_sleep)
    session.report.listeners.append(_log_turn(session))
    stop = stop_event(args.max_seconds)
    http = None
    if k.metrics_port:
        http = await serve_http(k.metrics_host, k.metrics_port, _routes(telemetry, models, live, gate))
    tasks: list[asyncio.Task[Any]] = []
    live.open_or_recover()
    try:
        tasks.append(asyncio.create_task(live.supervise(stop), name="audio-supervisor"))
        interval = watchdog_interval()
        if interval is not None:
            tasks.append(asyncio.create_task(keep_alive(notifier, interval, live.alive), name="watchdog"))
        greeting = k.greeting.format(wake_word=wake_phrase) if detector is not None else "Hello!"
        if greeting:
            live.output.write(0, models.phrase(greeting, rate))
        state = f"asleep: say {wake_phrase}" if detector is not None else "listening"
        notifier.ready(state)
        print(f"kiosk ready ({state})", flush=True)
        await session.run(gate.frames(live.frames(stop)))
    finally:
        for task in tasks:
            task.cancel()
        ended()
        if http is not None:
            http.close()
        live.__exit__(None, None, None)
    print(f"stopped: {gate.wakes} wake(s), {session.report.closed} turn(s), "
          f"{live.recoveries} device recover(ies)", file=sys.stderr, flush=True)
    return 0


def _log_turn(session: Any) -> Callable[[Any], None]:
    """One log line per closed turn (journald keeps it; scripts/soak.py reads it)."""

    def log_turn(record: Any) -> None:
        if record.noise:
            return
        data = session.report.turn_json(record)
        v2v = data["voice_to_voice_ms"]
        log.info(
            "turn %d %s: voice-to-voice %s; heard %r; said %r", record.turn_id, record.status,
            "-" if v2v is None else f"{v2v:.0f} ms", data["transcript"], data["reply"],
        )

    return log_turn


def _routes(
    telemetry: Telemetry, models: Any, live: Any, gate: WakeGate
) -> dict[str, Callable[[], tuple[int, bytes, str]]]:
    def metrics() -> tuple[int, bytes, str]:
        body, ctype = telemetry.exposition()
        return 200, body, ctype

    def healthz() -> tuple[int, bytes, str]:
        engine = models.llm.health()
        ready = engine["state"] == "up" and live.device_open
        body = {"status": "ok", "ready": ready, "awake": gate.awake, "engine": engine,
                "audio_device_open": live.device_open,
                "device_recoveries": live.recoveries, "time": time.time()}
        return 200, json.dumps(body).encode(), "application/json"

    return {"/metrics": metrics, "/healthz": healthz}
