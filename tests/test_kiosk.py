"""The kiosk: asleep until its wake word, awake for a conversation, asleep
again when idle; and the real `voice-assistant kiosk` under a notify socket.

The wake phrase is spoken by the bundled piper voice (the wake-word
evaluation measured it detected on 9 of 9 clean piper takes); everything
runs through the real wake-word model and the real pipeline.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from assistant.kiosk import WakeGate
from assistant.telemetry import parse, total
from assistant.session import Session
from audio.files import write_wav
from audio.frame import AudioFrame
from helpers import ASSETS, ROOT, cli_flags, expected_text, free_port, load_pcm, word_error_rate
from pipeline.playback import TimelineOutput
from pipeline.wake import WakeWordDetector, WakeWordSettings

sys.path.insert(0, str(ROOT / "scripts"))
from wake_eval import speak_piper  # noqa: E402

RATE = 16000
QUESTION = ASSETS / "questions" / "capital_of_france.wav"


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(RATE * seconds), np.int16)


class MarkDetector:
    """Fires on a frame whose first sample is the marker (unit tests of the gate)."""

    def __init__(self) -> None:
        self.resets = 0

    def process(self, pcm: np.ndarray) -> bool:
        return bool(len(pcm) and pcm[0] == 12345)

    def reset(self) -> None:
        self.resets += 1


def test_the_gate_passes_nothing_before_the_wake_word_and_sleeps_when_idle() -> None:
    busy = {"now": False}
    log: list[str] = []
    gate = WakeGate(MarkDetector(), idle_s=1.0, busy=lambda: busy["now"],
                    on_wake=lambda: log.append("wake"), on_sleep=lambda: log.append("sleep"))

    def frame(i: int, mark: bool = False) -> AudioFrame:
        pcm = np.zeros(320, np.int16)
        if mark:
            pcm[0] = 12345
        return AudioFrame(pcm=pcm, sample_rate=RATE, captured_at=100 + i * 0.02, position=i * 320)

    async def source():  # type: ignore[no-untyped-def]
        for i in range(200):  # 4 s
            if i == 40:
                busy["now"] = True  # a turn from 0.8 s ...
            if i == 100:
                busy["now"] = False  # ... to 2.0 s
            yield frame(i, mark=i == 20)

    async def collect() -> list[AudioFrame]:
        return [f async for f in gate.frames(source())]

    passed = asyncio.run(collect())
    positions = [f.position // 320 for f in passed]
    assert positions[0] == 21, "nothing before the wake word goes on"
    # awake from 0.42 s; busy until 2.0 s; asleep 1 s later (3.0 s = frame 150)
    assert positions == list(range(21, positions[-1] + 1)) and positions[-1] in (148, 149, 150)
    assert log == ["wake", "sleep"] and gate.detector.resets == 1 and not gate.awake


@pytest.mark.slow
def test_sleep_wake_converse_and_sleep_again(models: Any, config: Any, run: Any) -> None:
    """Asleep, a question is ignored; the wake word, then a question is
    answered; idle, it sleeps, and the next question is ignored again."""
    question = load_pcm(QUESTION)
    wake = speak_piper(models.piper, "Okay Nabu.")
    detector = WakeWordDetector(WakeWordSettings(model="okay_nabu"))
    output = TimelineOutput(config.audio.output_rate, RATE)
    session = Session(models, config, output)
    events: list[str] = []
    gate = WakeGate(
        detector, idle_s=3.0, busy=lambda: session.busy,
        on_wake=lambda: events.append("wake"), on_sleep=lambda: events.append("sleep"),
    )
    first = [silence(1.0), question, silence(1.5)]  # asleep: never heard
    wake_at = sum(len(x) for x in first) / RATE

    async def microphone():  # type: ignore[no-untyped-def]
        """Real-time frames: asleep, a question; the wake word and a question;
        silence until the kiosk sleeps; a question again (never heard)."""
        size = RATE * config.audio.frame_ms // 1000
        position = 0

        async def play(pcm: np.ndarray):  # type: ignore[no-untyped-def]
            nonlocal position
            for i in range(0, len(pcm) - size + 1, size):
                due = session.origin + (position + size) / RATE
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                yield AudioFrame(pcm=pcm[i : i + size].copy(), sample_rate=RATE, captured_at=due, position=position)
                position += size

        for pcm in [*first, wake, silence(0.8), question]:
            async for f in play(pcm):
                yield f
        for _ in range(60 * 1000 // config.audio.frame_ms):  # up to a minute of silence
            if "sleep" in events:
                break
            async for f in play(silence(config.audio.frame_ms / 1000)):
                yield f
        for pcm in [question, silence(1.5)]:
            async for f in play(pcm):
                yield f

    run(session.run(gate.frames(microphone())))
    turns = session.report.to_json()
    assert events == ["wake", "sleep"], events
    assert len(turns) == 1, [t["transcript"] for t in turns]
    assert turns[0]["status"] == "completed" and turns[0]["reply"]
    assert word_error_rate(expected_text(QUESTION), turns[0]["transcript"]) <= 0.2
    # The answered question is the one after the wake word, on the input's timeline.
    assert turns[0]["milestones_ms"]["speech_start"] / 1000 > wake_at


def _metric(text: str, name: str, **labels: str) -> float:
    return total(parse(text), name, **labels)


@pytest.mark.slow
def test_the_kiosk_under_a_notify_socket_wakes_and_answers(tmp_path: Path, models: Any) -> None:
    from virtual_audio import VirtualAudio, skip_if_unavailable

    skip_if_unavailable()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.2)
    port = free_port()
    speech = tmp_path / "wake_and_question.wav"
    write_wav(speech, np.concatenate([speak_piper(models.piper, "Okay Nabu."), silence(0.8), load_pcm(QUESTION)]),
              RATE)
    messages: list[str] = []

    def drain() -> None:
        while True:
            try:
                messages.append(notify.recv(4096).decode())
            except TimeoutError:
                return

    with VirtualAudio(tmp_path / "pulse") as va:
        env = {**os.environ, **va.env, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"}
        env.pop("WATCHDOG_PID", None)
        command = [sys.executable, "-m", "assistant", "kiosk", "--max-seconds", "240", *cli_flags(),
                   "--set", f"kiosk.metrics_port={port}"]
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not any(m.startswith("READY=1") for m in messages):
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                drain()
            assert any(m.startswith("READY=1") and "asleep" in m for m in messages), messages
            time.sleep(4)  # the greeting plays out
            va.play_into_mic(speech, lead_silence_s=0.5, trail_silence_s=0.5)
            metrics = ""
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                drain()
                metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                if _metric(metrics, "voice_assistant_turns_total", status="completed") >= 1:
                    break
            drain()
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
        finally:
            proc.send_signal(2)
            output = proc.communicate(timeout=60)[0]
            drain()
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert _metric(metrics, "voice_assistant_wake_detections_total") == 1, output[-2000:]
    assert _metric(metrics, "voice_assistant_turns_total", status="completed") >= 1, output[-2000:]
    assert _metric(metrics, "voice_assistant_voice_to_voice_seconds_count") >= 1
    assert health["ready"] is True and health["audio_device_open"] is True
    assert messages.count("WATCHDOG=1") >= 3, "the watchdog was pinged while it ran"
    assert any(m == "STATUS=awake: in a conversation" for m in messages), messages
    assert any(m.startswith("STOPPING=1") for m in messages), messages


@pytest.mark.slow
def test_the_kiosk_survives_its_microphone_unplugged_and_answers_after(tmp_path: Path, models: Any) -> None:
    """The microphone's source is removed mid-run and restored: the kiosk
    logs it, keeps running, reopens the device and answers the next question."""
    from virtual_audio import VirtualAudio, skip_if_unavailable

    skip_if_unavailable()
    port = free_port()
    health_url = f"http://127.0.0.1:{port}/healthz"

    def healthz() -> dict[str, Any]:
        return httpx.get(health_url, timeout=5).json()

    def wait_for(condition: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        return False

    with VirtualAudio(tmp_path / "pulse") as va:
        command = [sys.executable, "-m", "assistant", "kiosk", "--max-seconds", "240", *cli_flags(),
                   "--set", "kiosk.wake_word=none", "--set", f"kiosk.metrics_port={port}"]
        proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **va.env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            assert wait_for(lambda: healthz()["audio_device_open"], 300), "the kiosk never opened the microphone"
            va.remove_mic()
            assert wait_for(lambda: not healthz()["audio_device_open"], 15), "the lost microphone went unnoticed"
            time.sleep(3)  # a few reopen attempts fail meanwhile
            assert proc.poll() is None, "the kiosk ended when its microphone went away"
            va.restore_mic()
            assert wait_for(lambda: healthz()["audio_device_open"], 30), "the microphone was not reopened"
            va.play_into_mic(QUESTION, lead_silence_s=0.5, trail_silence_s=0.5)
            answered = wait_for(
                lambda: _metric(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text,
                                "voice_assistant_turns_total", status="completed") >= 1,
                90,
            )
            recoveries = healthz()["device_recoveries"]
        finally:
            proc.send_signal(2)
            output = proc.communicate(timeout=60)[0]
    assert answered, output[-3000:]
    assert recoveries >= 1
    assert "microphone lost" in output and "microphone back" in output, output[-3000:]
    assert "Traceback" not in output and proc.returncode == 0, output[-3000:]
