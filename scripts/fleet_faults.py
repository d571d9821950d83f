"""What a user hears when a part of a running fleet dies, and how fast service comes back.

Against a fleet started with ``voice-assistant fleet`` on this machine (the
script kills its processes, so it must run where they run), through the
load balancer, like a browser:

* ``replica``: a session asks a question; the engine replica that answered
  it (its ``/metrics`` say which) is killed (SIGKILL) the moment the next
  reply starts streaming; the script reports what that turn got (the error
  phrase or a reply) and streams the same question again until one is
  answered: the time from the kill to that answer's first audio.
* ``server``: a session asks a question; its voice server is killed; the
  client reconnects through the balancer, as the browser page does, and
  asks again: the time from the kill to the new session and to its answer.
* ``all-replicas``: every replica is killed; the next turn's answer.

::

    .venv/bin/python scripts/fleet_faults.py --url ws://127.0.0.1:8790/ws \\
        --engine-url http://127.0.0.1:8001 http://127.0.0.1:8002 \\
        --server-url http://127.0.0.1:8801 http://127.0.0.1:8802 --fault replica server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from assistant.client import ClientError, RemoteSession  # noqa: E402
from assistant.telemetry import scrape, total  # noqa: E402
from audio.files import read_wav  # noqa: E402

QUESTION = ROOT / "audio_assets" / "questions" / "capital_of_france.wav"


def requests_served(engine_url: str) -> float:
    try:
        return total(scrape(engine_url.rstrip("/") + "/metrics"), "vllm:e2e_request_latency_seconds_count")
    except Exception:
        return -1.0


def listener_tree(url: str) -> list[psutil.Process]:
    """The process listening on ``url``'s port, with its parent (``voice-assistant engine``) and children."""
    port = int(url.rstrip("/").rsplit(":", 1)[1].split("/")[0])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            proc = psutil.Process(conn.pid)
            tree = [proc, *proc.children(recursive=True)]
            parent = proc.parent()
            if parent is not None and "assistant engine" in " ".join(parent.cmdline()):  # not the fleet
                tree.insert(0, parent)
            return tree
    raise SystemExit(f"nothing listens on {url}")


def kill(tree: list[psutil.Process]) -> None:
    for proc in tree:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


async def ask(session: RemoteSession, pcm: np.ndarray, max_s: float = 60) -> dict[str, Any] | None:
    """Stream one question; the turn's metrics once it is over (None: the session ended first)."""
    answered = len(session.metrics)
    await session.stream(pcm)
    await session.stream_silence_until(lambda: len(session.metrics) > answered or session.closed, max_s=max_s)
    return list(session.metrics.values())[-1] if len(session.metrics) > answered else None


def heard(turn: dict[str, Any] | None, error_phrase: str) -> str:
    if turn is None:
        return "no answer (session ended)"
    reply = (turn.get("reply") or "").strip()
    return "the error phrase" if reply == error_phrase.strip() else f"a reply ({turn['status']}): {reply[:60]!r}"


async def replica_fault(args: argparse.Namespace, pcm: np.ndarray, error_phrase: str) -> dict[str, Any]:
    session = await RemoteSession.open(args.url, client="faults")
    before = {u: requests_served(u) for u in args.engine_url}
    first = await ask(session, pcm)
    served = [u for u in args.engine_url if requests_served(u) > before[u]]
    if not served:
        raise SystemExit("no replica counted the first turn's request")
    victim = served[0]
    tree = listener_tree(victim)
    # Kill it the moment the next reply starts streaming.
    deltas_seen = sum(1 for _, e in session.events if e.get("type") == "response.text.delta")
    killed: dict[str, float] = {}

    async def killer() -> None:
        while sum(1 for _, e in session.events if e.get("type") == "response.text.delta") == deltas_seen:
            await asyncio.sleep(0.005)
        kill(tree)
        killed["at"] = time.monotonic()

    task = asyncio.create_task(killer())
    during = await ask(session, pcm)
    await task
    tries = []
    answer_at = None
    for _ in range(args.retries):
        turn = await ask(session, pcm)
        tries.append(heard(turn, error_phrase) + f", voice to voice {turn and turn.get('voice_to_voice_ms')} ms")
        if turn is not None and (turn.get("reply") or "").strip() != error_phrase.strip():
            audio = [at for at, e in session.events if e.get("type") == "response.audio.start"]
            answer_at = audio[-1] if audio else None
            break
    await session.close()
    return {
        "fault": "replica killed mid-reply",
        "victim": victim,
        "first_turn": heard(first, error_phrase),
        "turn_cut": heard(during, error_phrase),
        "next_turns": tries,
        "kill_to_answer_s": None if answer_at is None else round(answer_at - killed["at"], 2),
    }


async def server_fault(args: argparse.Namespace, pcm: np.ndarray, error_phrase: str) -> dict[str, Any]:
    import urllib.request

    session = await RemoteSession.open(args.url, client="faults")
    first = await ask(session, pcm)
    victim = None
    for url in args.server_url:
        with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=2) as reply:
            if json.loads(reply.read())["sessions"] > 0:
                victim = url
    if victim is None:
        raise SystemExit("no voice server holds the session")
    kill(listener_tree(victim))
    killed_at = time.monotonic()
    await session.wait_closed(30)
    closed_at = time.monotonic()
    reconnect = None
    attempts = 0
    while reconnect is None and time.monotonic() - killed_at < 60:
        attempts += 1
        try:
            reconnect = await RemoteSession.open(args.url, client="faults-reconnect")
        except ClientError:
            await asyncio.sleep(0.5)
    if reconnect is None:
        return {"fault": "voice server killed", "victim": victim, "reconnected": False}
    ready_at = time.monotonic()
    turn = await ask(reconnect, pcm)
    audio = [at for at, e in reconnect.events if e.get("type") == "response.audio.start"]
    await reconnect.close()
    return {
        "fault": "voice server killed mid-session",
        "victim": victim,
        "first_turn": heard(first, error_phrase),
        "client_saw_close_s": round(closed_at - killed_at, 2),
        "close_code": session.close_code,
        "reconnect_attempts": attempts,
        "kill_to_new_session_s": round(ready_at - killed_at, 2),
        "after_reconnect": heard(turn, error_phrase),
        "kill_to_answer_s": round(audio[-1] - killed_at, 2) if audio else None,
    }


async def all_replicas_fault(args: argparse.Namespace, pcm: np.ndarray, error_phrase: str) -> dict[str, Any]:
    session = await RemoteSession.open(args.url, client="faults")
    for url in args.engine_url:
        with_tree = listener_tree(url)
        kill(with_tree)
    killed_at = time.monotonic()
    turn = await ask(session, pcm)
    done_at = time.monotonic()
    errors = [e for _, e in session.events if e.get("type") == "error"]
    await session.close()
    return {
        "fault": "every replica down",
        "heard": heard(turn, error_phrase),
        "turn_over_after_kill_s": round(done_at - killed_at, 2),
        "error_events": [f"{e.get('code')}: {e.get('message')}" for e in errors][:2],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the load balancer's ws:// URL")
    parser.add_argument("--engine-url", nargs="+", default=[], help="each engine replica's URL")
    parser.add_argument("--server-url", nargs="+", default=[], help="each voice server's http:// URL")
    parser.add_argument("--fault", nargs="+", choices=["replica", "server", "all-replicas"], default=["replica"])
    parser.add_argument("--retries", type=int, default=5, help="questions asked after a replica's death")
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args()
    from assistant.config import load_config

    error_phrase = load_config(None, []).llm.error_phrase
    pcm = read_wav(QUESTION)[0]
    runs = {"replica": replica_fault, "server": server_fault, "all-replicas": all_replicas_fault}
    results = []
    for fault in args.fault:
        result = asyncio.run(runs[fault](args, pcm, error_phrase))
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
