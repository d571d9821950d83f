"""Operating the assistant: systemd's notify protocol and Prometheus metrics.

sd_notify is checked against a real datagram socket the test creates (as
systemd does); ``/metrics`` is scraped from the real server after a real
spoken turn and parsed with ``prometheus_client.parser``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from assistant.client import RemoteSession
from assistant.server.listener import Server
from assistant.systemd import Notifier, keep_alive, watchdog_interval
from helpers import ASSETS, load_pcm


def _listener(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    return sock, path


def _received(sock: socket.socket) -> list[tuple[float, str]]:
    out = []
    while True:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except BlockingIOError:
            return out


def test_sd_notify_ready_status_and_watchdog_only_while_alive(tmp_path: Path) -> None:
    sock, path = _listener(tmp_path)
    notifier = Notifier(path)
    assert notifier.ready("listening for the wake word")
    notifier.status("talking\nwith someone")
    messages = [m for _, m in _received(sock)]
    assert messages == ["READY=1\nSTATUS=listening for the wake word", "STATUS=talking with someone"]

    alive = {"audio": True}
    pings: list[float] = []

    def on_datagram() -> None:
        for at, message in _received(sock):
            if message == "WATCHDOG=1":
                pings.append(at - started)

    async def scenario() -> None:
        asyncio.get_running_loop().add_reader(sock.fileno(), on_datagram)
        pinger = asyncio.create_task(keep_alive(notifier, 0.05, lambda: alive["audio"]))
        await asyncio.sleep(0.5)  # pings flow
        time.sleep(0.6)  # the event loop is blocked: nothing can ping
        await asyncio.sleep(0.3)
        alive["audio"] = False  # the audio callback stopped: pings stop
        await asyncio.sleep(0.5)
        pinger.cancel()
        asyncio.get_running_loop().remove_reader(sock.fileno())

    started = time.monotonic()
    asyncio.run(scenario())
    assert len(pings) >= 5, pings
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) >= 0.55, "a ping was sent while the loop was blocked"
    assert pings[-1] < 1.5, "pings went on after the audio stream died"
    notifier.close()
    sock.close()


def test_sd_notify_is_a_no_op_outside_systemd_and_reads_the_interval() -> None:
    notifier = Notifier("")
    assert not notifier.enabled and not notifier.ready("x") and not notifier.watchdog()
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # another process's
    assert watchdog_interval({}) is None


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.slow
def test_metrics_hold_a_spoken_turn(models: Any, config: Any, run: Any) -> None:
    question = load_pcm(ASSETS / "questions" / "capital_of_france.wav")

    async def main() -> tuple[str, str, dict[str, Any]]:
        async with Server(models, config, host="127.0.0.1", port=0, token="") as server:
            base = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient() as http:
                health = (await http.get(f"{base}/healthz")).json()
                session = await RemoteSession.open(server.ws_url, client="metrics-test")
                await session.stream(question)
                await session.stream_silence_until(lambda: len(session.metrics) > 0, max_s=40)
                during = (await http.get(f"{base}/metrics")).text
                await session.end_input()
                await session.wait_closed(30)
                await asyncio.sleep(0.2)
                after = (await http.get(f"{base}/metrics")).text
        return during, after, health

    during, after, health = run(main())
    assert health["ready"] is True and health["engine"]["state"] == "up"
    s = _samples(during)
    assert s[("voice_assistant_sessions", frozenset())] == 1
    assert s[("voice_assistant_turns_total", frozenset({("status", "completed")}))] >= 1
    assert s[("voice_assistant_voice_to_voice_seconds_count", frozenset())] >= 1
    v2v = s[("voice_assistant_voice_to_voice_seconds_sum", frozenset())]
    assert 0 < v2v < 30, "voice to voice is in seconds"
    assert s[("voice_assistant_stage_latency_seconds_count", frozenset({("stage", "asr_final")}))] >= 1
    assert s[("voice_assistant_engine_up", frozenset())] == 1
    assert s[("voice_assistant_models_loaded", frozenset())] == 1
    # What a leak shows first: the session's tasks are alive during, gone after.
    tasks_during = s[("voice_assistant_asyncio_tasks", frozenset())]
    assert tasks_during > _samples(after)[("voice_assistant_asyncio_tasks", frozenset())] >= 1
    assert s[("voice_assistant_threads", frozenset())] >= 2
    assert s[("process_open_fds", frozenset())] > 0 and s[("process_resident_memory_bytes", frozenset())] > 0
    assert _samples(after)[("voice_assistant_sessions", frozenset())] == 0
