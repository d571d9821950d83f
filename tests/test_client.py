"""``voice-assistant client`` and ``serve`` from the command line, for real.

The client runs in a subprocess against a server running in this process
(on the test session's one event loop, port 0); the mistakes (nothing
listening, a missing file, a bad URL, a busy port) need no models and end
with one line and the documented exit code.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np

from assistant.config import Config
from assistant.server.listener import Server
from audio.files import read_wav
from helpers import ASSETS, ROOT, expected_text, word_error_rate
from test_cli import cli, one_line_error


def test_client_talks_to_a_server_and_saves_the_reply(models: Any, config: Config, run: Any, tmp_path: Path) -> None:
    wav = ASSETS / "questions" / "largest_planet.wav"
    out = tmp_path / "reply.wav"

    async def main() -> tuple[int, str, str]:
        async with Server(models, config, host="127.0.0.1", port=0, token="t0k") as server:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "assistant", "client", "--url", server.url, "--input", str(wav),
                "--output", str(out), "--token", "t0k",
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "VOICE_ASSISTANT_TOKEN": ""},
            )
            stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
            return process.returncode or 0, stdout.decode(), stderr.decode()

    code, stdout, stderr = run(main())
    assert code == 0, stderr
    assert "Traceback" not in stderr and "session ended (input_ended)" in stderr
    lines = stdout.splitlines()
    said = next(line for line in lines if line.strip().startswith("you:"))
    assert word_error_rate(expected_text(wav), said.split("you:", 1)[1]) <= 0.25
    assert any(line.strip().startswith("assistant:") for line in lines)
    assert any(line.strip().startswith("voice-to-voice:") and line.strip().endswith(" ms") for line in lines)
    pcm, rate = read_wav(out)
    input_seconds = len(read_wav(wav)[0]) / 16000
    assert rate == 22050 and len(pcm) / rate >= input_seconds
    voiced = np.flatnonzero(np.abs(pcm) > 500)
    assert len(voiced) > rate // 2
    # The reply lies after the question on the input's timeline.
    assert voiced[0] / rate > 1.5


def test_client_cannot_connect() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = cli("client", "--url", f"ws://127.0.0.1:{port}", "--input", str(ASSETS / "questions" / "moon_fact.wav"))
    one_line_error(result, 4, f"cannot connect to ws://127.0.0.1:{port}/ws", "connection refused")


def test_client_bad_input_and_url(tmp_path: Path) -> None:
    one_line_error(cli("client", "--url", "ws://127.0.0.1:9", "--input", str(tmp_path / "nope.wav")), 2, "nope.wav")
    text = tmp_path / "notes.txt"
    text.write_text("not audio\n" * 100)
    one_line_error(cli("client", "--url", "ws://127.0.0.1:9", "--input", str(text)), 2, "notes.txt")
    wav = str(ASSETS / "questions" / "moon_fact.wav")
    one_line_error(cli("client", "--url", "ftp://example.org", "--input", wav), 2, "--url")
    one_line_error(cli("client", "--url", "ws://127.0.0.1:9", "--input", wav, "--output", "/no/such/dir/o.wav"), 2,
                   "--output")


def test_serve_on_a_busy_port_fails_at_once() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = cli("serve", "--host", "127.0.0.1", "--port", str(port), timeout=30)
    one_line_error(result, 4, f"cannot listen on 127.0.0.1:{port}")
    assert "loading" not in result.stderr  # refused before any model was loaded


def test_client_refused_by_auth_says_so(models: Any, config: Config, run: Any) -> None:
    """A wrong token (here from the environment): 401, exit 4 and a hint about the token."""

    async def main() -> tuple[int, str]:
        async with Server(models, config, host="127.0.0.1", port=0, token="right") as server:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "assistant", "client", "--url", server.ws_url,
                "--input", str(ASSETS / "questions" / "moon_fact.wav"),
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "VOICE_ASSISTANT_TOKEN": "wrong"},
            )
            _, stderr = await asyncio.wait_for(process.communicate(), 60)
            return process.returncode or 0, stderr.decode()

    code, stderr = run(main())
    assert code == 4 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "HTTP 401" in errors[0] and "token" in errors[0]
