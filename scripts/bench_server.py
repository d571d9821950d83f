"""Voice-to-voice latency of the websocket server under concurrent sessions.

Starts the real server in-process (models loaded once, as ``serve`` does) or
uses a running one (``--url``), then opens N sessions at once. Each streams
the committed questions at real-time pace like a microphone: a question,
silence until that turn's ``turn.metrics`` arrives (the reply has been
played), a short gap, the next question. Sessions start staggered and take
the questions in rotated order, so their turns overlap without being in
lock-step. Prints voice-to-voice p50/p95/max over every completed turn,
from the server's ``turn.metrics`` events.

    .venv/bin/python scripts/bench_server.py --sessions 4
    .venv/bin/python scripts/bench_server.py --url ws://host:8765 --sessions 4 --token T

Several voice servers sharing one engine (``serve --set llm.engine=remote``
each, the sessions spread over them in turn), with the engine's own figures
read from its ``/metrics`` before and after (prefix-cache hit rate,
speculative acceptance, time to first token, inter-token latency, requests
per engine step):

    .venv/bin/python scripts/bench_server.py --sessions 4 \\
        --url ws://127.0.0.1:8801 ws://127.0.0.1:8802 --engine-url http://127.0.0.1:8000/v1

Through a fleet (``voice-assistant fleet``): the load balancer's URL, each
engine replica's URL (figures per replica: requests, prefix-cache hit
rate), and a capacity curve, one run per session count::

    .venv/bin/python scripts/bench_server.py --url ws://127.0.0.1:8790/ws --sessions 1 2 4 6 8 \\
        --engine-url http://127.0.0.1:8001 http://127.0.0.1:8002

A session the server refuses (load-aware admission, "too many sessions")
is counted as refused and its turns as lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
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


async def one_session(url: str, token: str | None, index: int, questions: list[np.ndarray], gap_s: float,
                      stagger_s: float) -> dict[str, Any]:
    from assistant.client import ClientError

    await asyncio.sleep(index * stagger_s)
    try:
        session = await RemoteSession.open(url, token=token, client=f"bench-{index}")
    except ClientError as exc:
        return {"session": None, "turns": [], "ended": None, "close": None, "refused": str(exc)}
    order = questions[index % len(questions) :] + questions[: index % len(questions)]
    gap = np.zeros(int(16000 * gap_s), np.int16)
    for pcm in order:
        answered = len(session.metrics)
        await session.stream(pcm)
        await session.stream_silence_until(lambda: len(session.metrics) > answered, max_s=40)
        await session.stream(gap)
    await session.end_input()
    await session.wait_closed(60)
    turns = [m for m in session.metrics.values() if m.get("transcript")]
    return {"session": session.session_id, "turns": turns, "ended": session.ended_reason, "close": session.close_code}


async def bench(urls: list[str], token: str | None, sessions: int, questions: list[np.ndarray], gap_s: float,
                stagger_s: float) -> list[dict[str, Any]]:
    """N sessions, spread over the servers in turn (session i on server i mod len)."""
    runs = [one_session(urls[i % len(urls)], token, i, questions, gap_s, stagger_s) for i in range(sessions)]
    results = list(await asyncio.gather(*runs))
    for i, r in enumerate(results):
        r["server"] = urls[i % len(urls)]
    return results


def engine_figures(before: list[Any], after: list[Any]) -> dict[str, float | None]:
    """The engine's own figures over the run, from two /metrics scrapes."""
    from assistant.telemetry import total

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return {
        "requests": delta("vllm:e2e_request_latency_seconds_count"),
        "prefix_cache_hit_rate": ratio(delta("vllm:prefix_cache_hits_total"), delta("vllm:prefix_cache_queries_total")),
        "spec_acceptance": ratio(
            delta("vllm:spec_decode_num_accepted_tokens_total"), delta("vllm:spec_decode_num_draft_tokens_total")
        ),
        "ttft_mean_ms": _ms(ratio(delta("vllm:time_to_first_token_seconds_sum"),
                                  delta("vllm:time_to_first_token_seconds_count"))),
        "itl_mean_ms": _ms(ratio(delta("vllm:inter_token_latency_seconds_sum"),
                                 delta("vllm:inter_token_latency_seconds_count"))),
        "tokens_per_step": ratio(delta("vllm:iteration_tokens_total_sum"), delta("vllm:iteration_tokens_total_count")),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


async def in_process(args: argparse.Namespace, questions: list[np.ndarray]) -> list[dict[str, Any]]:
    from assistant.config import load_config
    from assistant.models import load_models
    from assistant.server.listener import Server

    config = load_config(args.config, args.set)
    models = load_models(config)
    try:
        await models.warm_up()
        async with Server(models, config, host="127.0.0.1", port=0, token="") as server:
            print(f"server on {server.ws_url}", file=sys.stderr, flush=True)
            return await bench([server.ws_url], None, args.sessions, questions, args.gap, args.stagger)
    finally:
        models.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", nargs="+", help="running server(s) (default: start one in-process)")
    parser.add_argument("--engine-url", nargs="+", default=[],
                        help="the remote engine(s) the servers share, each replica's URL: report their /metrics figures")
    parser.add_argument("--token", help="bearer token for --url")
    parser.add_argument("--sessions", type=int, nargs="+", default=[4],
                        help="concurrent sessions; several counts: one run each, then the capacity curve")
    parser.add_argument("--questions", type=int, default=0, help="use only the first N questions (0 = all)")
    parser.add_argument("--gap", type=float, default=0.5, help="silence after each answer, seconds")
    parser.add_argument("--stagger", type=float, default=0.7, help="delay between session starts, seconds")
    parser.add_argument("--json", metavar="OUT.json", help="write every turn's metrics")
    parser.add_argument("--config", help="config file (in-process server)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()

    files = sorted((ROOT / "audio_assets" / "questions").glob("*.wav"))
    if args.questions:
        files = files[: args.questions]
    questions = [read_wav(f)[0] for f in files]
    curve = []
    runs = []
    ok = True
    for sessions in args.sessions:
        args_one = argparse.Namespace(**{**vars(args), "sessions": sessions})
        run = one_run(args_one, questions)
        runs.append(run)
        curve.append((sessions, run["summary"]))
        ok = ok and run["summary"]["lost"] == 0
    if len(curve) > 1:
        print("\ncapacity curve (voice to voice ms; lost = turns not completed, refused = sessions refused):")
        print("  sessions    p50    p95    max   lost  refused")
        for sessions, sm in curve:
            print(f"  {sessions:8d} {_fmt(sm['p50']):>6} {_fmt(sm['p95']):>6} {_fmt(sm['max']):>6} "
                  f"{sm['lost']:6d} {sm['refused']:8d}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs if len(runs) > 1 else runs[0], indent=2) + "\n")
    return 0 if ok else 1


def _fmt(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:.0f}"


def one_run(args: argparse.Namespace, questions: list[np.ndarray]) -> dict[str, Any]:
    """One run at ``args.sessions`` sessions: prints its figures, returns them."""
    from assistant.telemetry import scrape as scrape_url

    roots = [u.rstrip("/").removesuffix("/v1") for u in args.engine_url]

    def scrape() -> list[list[Any]]:
        return [scrape_url(root + "/metrics") for root in roots]

    before = scrape()
    started = time.monotonic()
    if args.url:
        results = asyncio.run(bench(args.url, args.token, args.sessions, questions, args.gap, args.stagger))
    else:
        results = asyncio.run(in_process(args, questions))
    wall = time.monotonic() - started

    v2v = [t["voice_to_voice_ms"] for r in results for t in r["turns"] if t["status"] == "completed"
           and t["voice_to_voice_ms"] is not None]
    completed = sum(1 for r in results for t in r["turns"] if t["status"] == "completed")
    expected = args.sessions * len(questions)
    refused = [r for r in results if r.get("refused")]
    print(f"{args.sessions} concurrent sessions x {len(questions)} questions, real-time pace ({wall:.0f} s)")
    for r in results:
        if r.get("refused"):
            print(f"  refused: {r['refused']}")
            continue
        statuses = [t["status"] for t in r["turns"]]
        print(f"  {r['session']}: {statuses.count('completed')}/{len(questions)} completed, ended {r['ended']} "
              f"(close {r['close']}), v2v ms {[round(t['voice_to_voice_ms'] or 0) for t in r['turns']]}")
    print(f"completed turns: {completed}/{expected}" + (f", {len(refused)} session(s) refused" if refused else ""))
    summary: dict[str, Any] = {"p50": None, "p95": None, "max": None, "lost": expected - completed,
                               "refused": len(refused)}
    if v2v:
        summary.update(p50=percentile(v2v, 50), p95=percentile(v2v, 95), max=max(v2v))
        print(f"voice-to-voice: p50 {percentile(v2v, 50):.0f} ms, p95 {percentile(v2v, 95):.0f} ms, "
              f"max {max(v2v):.0f} ms, mean {statistics.fmean(v2v):.0f} ms (n={len(v2v)})")
    servers = sorted({r.get("server") for r in results if r.get("server")})
    if len(servers) > 1:
        for url in servers:
            own = [t["voice_to_voice_ms"] for r in results if r.get("server") == url for t in r["turns"]
                   if t["status"] == "completed" and t["voice_to_voice_ms"] is not None]
            if own:
                print(f"  {url}: p50 {percentile(own, 50):.0f} ms, p95 {percentile(own, 95):.0f} ms (n={len(own)})")
    figures = []
    for root, b, a in zip(roots, before, scrape()):
        one = engine_figures(b, a)
        figures.append({"engine": root, **one})
        shown = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in one.items())
        print(f"engine {root}: {shown}")
    return {"sessions": results, "wall_s": round(wall, 1), "engines": figures, "summary": summary}


if __name__ == "__main__":
    sys.exit(main())
