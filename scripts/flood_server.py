"""What one flooding client does to everyone else: /healthz latency and another session's voice-to-voice.

Starts the real server in-process (models loaded once). A victim session
asks the committed questions at real-time pace (a question, silence until
its turn.metrics) while a prober GETs /healthz every 50 ms. With ``--flood``
another client, in a process of its own (in this one it would starve the
server's event loop itself, which is not what a remote flooder does), floods: it opens a session and sends tiny frames (``text``:
a playback.position; ``binary``: 2 bytes) as fast as its socket takes them,
300,000 per connection, and when the server closes it, it connects and
floods again, until the victim is done. Prints /healthz p50/p95/max and the
victim's voice-to-voice p50/max, and how often the flooder was closed. The
models load once; each phase (``none``: the baseline) gets a fresh server.

    .venv/bin/python scripts/flood_server.py                      # none, binary, text
    .venv/bin/python scripts/flood_server.py --flood binary --questions 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from assistant.client import RemoteSession  # noqa: E402
from audio.files import read_wav  # noqa: E402
from pipeline.metrics import percentile  # noqa: E402


def flood_process(url: str, kind: str, frames: int, stop: Any, closes: Any) -> None:
    """The flooder's own process and event loop; ``closes`` gets each close code."""
    found: list[Any] = []
    try:
        asyncio.run(flooder(url, kind, frames, stop, found))
    finally:
        closes.put(found)


async def flooder(url: str, kind: str, frames: int, stop: Any, closes: list[Any]) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    frame: str | bytes = (json.dumps({"type": "playback.position", "turn_id": 1, "samples": 0}) if kind == "text"
                          else b"\x00\x00")
    while not stop.is_set():
        try:
            async with connect(url, max_queue=None) as ws:
                await ws.send(json.dumps({"type": "session.start", "protocol": 1, "client": "flood"}))
                for _ in range(frames):
                    if stop.is_set():
                        break
                    await ws.send(frame)
                with contextlib.suppress(ConnectionClosed, TimeoutError):
                    async with asyncio.timeout(5):
                        async for _ in ws:
                            pass
                closes.append(ws.close_code)
        except (ConnectionClosed, OSError) as exc:
            closes.append(getattr(exc, "rcvd", None) and exc.rcvd.code)  # type: ignore[union-attr]
        await asyncio.sleep(0.05)


async def prober(port: int, stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        began = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        await reader.read()
        writer.close()
        latencies.append((time.monotonic() - began) * 1000)
        await asyncio.sleep(0.05)


async def victim(url: str, questions: list[np.ndarray]) -> tuple[list[float], str]:
    """The other user's voice-to-voice per completed turn, and how its session ended."""
    from websockets.exceptions import ConnectionClosed

    from assistant.client import ClientError

    try:
        session = await RemoteSession.open(url, client="victim")
    except ClientError as exc:  # the flood kept the victim from even starting
        return [], f"NOT OPENED: {exc}"
    try:
        for pcm in questions:
            answered = len(session.metrics)
            await session.stream(pcm)
            await session.stream_silence_until(lambda: len(session.metrics) > answered, max_s=40)
            await session.stream(np.zeros(8000, np.int16))
        await session.end_input()
        await session.wait_closed(60)
        ended = f"{session.ended_reason} ({session.close_code})"
    except ConnectionClosed as exc:  # the flood took the victim's session down
        ended = f"LOST: {exc}"
    return [m["voice_to_voice_ms"] for m in session.metrics.values()
            if m.get("transcript") and m["voice_to_voice_ms"] is not None], ended


async def phase(server: Any, flood: str, frames: int, questions: list[np.ndarray]) -> dict[str, Any]:
    stop = asyncio.Event()
    latencies: list[float] = []
    closes: list[Any] = []
    tasks = [asyncio.create_task(prober(server.port, stop, latencies))]
    context = multiprocessing.get_context("spawn")
    flood_stop, flood_closes = context.Event(), context.Queue()
    process = None
    if flood != "none":
        process = context.Process(target=flood_process, args=(server.ws_url, flood, frames, flood_stop, flood_closes))
        process.start()
        await asyncio.sleep(3.0)  # the flood is on before the victim speaks
    v2v, ended = await victim(server.ws_url, questions)
    stop.set()
    flood_stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    if process is not None:
        closes.extend(await asyncio.to_thread(flood_closes.get, True, 30))
        process.join(10)
    return {"healthz_ms": latencies, "v2v_ms": v2v, "victim": ended, "flood_closes": closes}


async def measure(args: argparse.Namespace, questions: list[np.ndarray]) -> dict[str, dict[str, Any]]:
    from assistant.config import load_config
    from assistant.models import load_models
    from assistant.server.listener import Server

    config = load_config(args.config, args.set)
    models = load_models(config)
    results = {}
    try:
        await models.warm_up()
        for flood in args.flood:
            async with Server(models, config, host="127.0.0.1", port=0, token="") as server:
                results[flood] = r = await phase(server, flood, args.frames, questions)
            report(flood, r)
    finally:
        models.close()
    return results


def report(flood: str, r: dict[str, Any]) -> None:
    h, v = r["healthz_ms"], r["v2v_ms"]
    print(f"flood: {flood}; /healthz ms p50 {percentile(h, 50):.0f}, p95 {percentile(h, 95):.0f}, "
          f"max {max(h):.0f} (n={len(h)}); victim voice-to-voice ms p50 "
          f"{percentile(v, 50) if v else float('nan'):.0f}, max {max(v) if v else float('nan'):.0f} "
          f"{[round(x) for x in v]}, victim session {r['victim']}; flooder closed {len(r['flood_closes'])} time(s), "
          f"codes {sorted(set(map(str, r['flood_closes'])))}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", nargs="+", choices=["none", "text", "binary"], default=["none", "binary", "text"],
                        help="phases: no flood, tiny text frames, 2-byte binary frames")
    parser.add_argument("--frames", type=int, default=300_000, help="frames per flooding connection")
    parser.add_argument("--questions", type=int, default=2, help="how many committed questions the victim asks")
    parser.add_argument("--config", help="config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    files = sorted((ROOT / "audio_assets" / "questions").glob("*.wav"))[: args.questions]
    asyncio.run(measure(args, [read_wav(f)[0] for f in files]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
