"""``voice-assistant serve`` as a process: signals end it cleanly and take the engine with it.

A real process (it loads the models itself: about a minute on two cores),
a real client on loopback, real signals.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from helpers import ASSETS, ROOT, cli_flags, load_pcm

pytestmark = pytest.mark.slow


def start_serve() -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "assistant", "serve", "--host", "127.0.0.1", "--port", "0", "--token", "", *cli_flags()],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "VOICE_ASSISTANT_TOKEN": ""},
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 300
    for line in process.stdout:
        found = re.search(r"serving on http://127\.0\.0\.1:(\d+)/", line)
        if found:
            return process, int(found.group(1))
        assert time.monotonic() < deadline, "serve did not start"
    raise AssertionError(f"serve exited ({process.wait()}) before serving")


async def session_through_two_signals(port: int, pid: int, sig: signal.Signals) -> dict[str, Any]:
    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.send(json.dumps({"type": "session.start", "protocol": 1}))
        ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
        question = load_pcm(ASSETS / "questions" / "spider_legs.wav")
        for offset in range(0, len(question), 320):  # a question at the microphone's pace: a turn in flight
            await ws.send(question[offset : offset + 320].astype("<i2").tobytes())
            await asyncio.sleep(0.02)
        os.kill(pid, sig)
        await asyncio.sleep(0.5)
        os.kill(pid, sig)
        seen: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(20):
                async for message in ws:
                    if isinstance(message, str):
                        seen.append(json.loads(message))
        except ConnectionClosed:
            pass
        return {"ready": ready, "events": seen, "close_code": ws.close_code}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_two_signals_tell_the_clients_and_leave_no_engine_behind(sig: signal.Signals) -> None:
    process, port = start_serve()
    try:
        children = psutil.Process(process.pid).children(recursive=True)
        assert children, "the engine runs in child processes"
        r = asyncio.run(session_through_two_signals(port, process.pid, sig))
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert r["ready"]["type"] == "session.ready"
    assert r["events"] and r["events"][-1]["type"] == "session.ended", r["events"]
    assert r["events"][-1]["reason"] == "shutdown"
    assert r["close_code"] == 1001
    # 0: the second signal hurried the loop's shutdown; 128 + signal: it came once the sessions were
    # closed, while the engine stopped, and ended the process there (the engine's processes first).
    assert code in (0, 128 + sig), code
    time.sleep(0.5)
    left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(c.pid, c.name()) for c in left]
