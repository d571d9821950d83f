"""The browser client in a real browser, against the real server and models.

Headless Chromium (Debian's ``chromium``, driven by ``playwright-core`` from
``tests/browser``) gets a fake microphone that plays
``audio_assets/browser/capital_of_france_30s.wav``; ``browser_turn.mjs`` opens
the page the server serves, presses Start, and waits for a final transcript
and for reply audio to be played (the page's ``window.assistantState``). The
server runs in-process on the session's one event loop (vLLM is bound to
it), on port 0, with a token that the page must pass on to ``/ws``.

Skipped, with the reason, when Chromium, Node.js or the npm packages are
missing, except in CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from assistant.telemetry import parse, total
from helpers import ASSETS, ROOT, word_error_rate, words

BROWSER_DIR = ROOT / "tests" / "browser"
DRIVER = BROWSER_DIR / "browser_turn.mjs"
WAV = ASSETS / "browser" / "capital_of_france_30s.wav"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TOKEN = "browser-test-token"
TIMEOUT_S = 120  # the driver's own limit; the turn itself takes a few seconds


def _missing() -> list[str]:
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if shutil.which("node") is None:
        missing.append("Node.js (apt-get install nodejs npm)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        missing.append("playwright-core (cd tests/browser && npm ci)")
    return missing


# Session scope, first in the test's arguments: checked before the models load.
@pytest.fixture(scope="session")
def browser_ready() -> None:
    missing = _missing()
    if missing:
        message = "the browser test needs " + ", ".join(missing) + "; scripts/install.sh installs them (as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_browser_turn(browser_ready: None, models: Any, config: Any, run: Callable[..., Any], tmp_path: Path) -> None:
    from assistant.server.listener import Server

    screenshot = tmp_path / "browser.png"

    client_heard: list[float] = []  # the server's count of playback.heard, when the page is done

    async def scenario() -> tuple[int, str, str]:
        async with Server(models, config, host="127.0.0.1", port=0, token=TOKEN) as server:
            proc = await asyncio.create_subprocess_exec(
                shutil.which("node") or "node",
                str(DRIVER),
                "--url", f"{server.url}?token={TOKEN}",
                "--wav", str(WAV),
                "--screenshot", str(screenshot),
                "--timeout", str(TIMEOUT_S),
                "--chromium", CHROMIUM,
                cwd=BROWSER_DIR,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S + 60)
            except TimeoutError:
                proc.kill()
                out, err = await proc.communicate()
                return -1, out.decode(), err.decode() + "\n(the driver did not exit; killed)"
            body, _ = server.telemetry.exposition()
            client_heard.append(total(parse(body.decode()), "voice_assistant_client_voice_to_voice_seconds_count"))
            return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = run(scenario())
    assert code == 0, f"browser_turn.mjs exited {code}\nstderr:\n{err[-3000:]}\nstdout:\n{out[-3000:]}"
    result = json.loads(out.strip().splitlines()[-1])
    state = result["state"]
    summary = ("final", "reply", "playedSamples", "outputRate", "voiceToVoiceMs", "heardVoiceToVoiceMs", "elapsedMs")
    print(json.dumps({key: result.get(key) for key in summary}))

    expected = WAV.with_suffix(".txt").read_text(encoding="utf-8").strip()
    final = result["final"]
    assert final, f"no final transcript: {state}"
    assert word_error_rate(expected, final) <= 0.25, f"heard {final!r}, said {expected!r}"
    assert {"capital", "france"} <= set(words(final)), final

    # Reply audio played by the page (at least 0.3 s), and its text shown.
    assert result["outputRate"], state
    assert result["playedSamples"] >= 0.3 * result["outputRate"], state
    assert result["reply"] and words(result["reply"]), state
    turn = next(t for t in state["turns"] if t["final"])
    assert turn["playedSamples"] > 0
    assert turn["status"] in ("speaking", "completed"), turn
    assert state["errors"] == [], state["errors"]
    # What the user really waited, measured by the page (its microphone's
    # capture to its speaker's output, AudioContext clocks) and sent back: it
    # holds the server's span plus the network, jitter buffer and device
    # latencies, so it is not much shorter than the server's figure.
    server_ms, heard_ms = result["voiceToVoiceMs"], result["heardVoiceToVoiceMs"]
    assert heard_ms is not None, state
    assert 0.8 * server_ms <= heard_ms <= server_ms + 3000, (server_ms, heard_ms)
    assert client_heard == [1], "the page's figure did not reach the server (playback.heard)"
    assert state["sessions"] == 1, "the page reconnected during the test"

    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 5000
    if os.environ.get("BROWSER_SCREENSHOT"):  # e.g. docs/browser.png
        shutil.copyfile(screenshot, ROOT / os.environ["BROWSER_SCREENSHOT"])
