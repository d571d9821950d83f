"""The websocket bridge with a real server on loopback and the real models.

Every test runs the server in-process on the test session's one event loop
(port 0) and talks to it as a remote program would: raw websockets for the
protocol's details, :class:`assistant.server.client.RemoteSession` for whole turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from assistant.client import RemoteSession
from assistant.config import Config, load_config
from assistant.server.listener import Server
from audio.resample import Resampler
from helpers import ASSETS, expected_text, load_pcm, speech_span, word_error_rate
from pipeline.frames import LLMToken
from pipeline.metrics import percentile

pytestmark = pytest.mark.slow

Message = tuple[float, str | bytes]


def config_with(*overrides: str) -> Config:
    return load_config(None, list(overrides))


async def start_session(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "session.start", "protocol": 1, **fields}))
    while True:
        message = await asyncio.wait_for(ws.recv(), 10)
        if isinstance(message, str):
            event = json.loads(message)
            assert event["type"] in ("session.ready", "error"), event
            return event


async def next_event(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    """The next JSON event (binary frames skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            message = await ws.recv()
            if isinstance(message, str):
                return json.loads(message)


async def until_closed(ws: ClientConnection, timeout: float = 60) -> list[Message]:
    """Every message until the server closes, with its arrival time."""
    loop = asyncio.get_running_loop()
    messages: list[Message] = []
    async with asyncio.timeout(timeout):
        try:
            async for message in ws:
                messages.append((loop.time(), message))
        except ConnectionClosed:
            pass
    return messages


def events(messages: list[Message]) -> list[dict[str, Any]]:
    return [json.loads(m) for _, m in messages if isinstance(m, str)]


async def stream(ws: ClientConnection, pcm: np.ndarray, rate: int) -> None:
    """PCM16 in 20 ms frames at real-time pace."""
    loop = asyncio.get_running_loop()
    size = rate // 50
    t0 = loop.time()
    for index, offset in enumerate(range(0, len(pcm), size)):
        await asyncio.sleep(max(0.0, t0 + (index + 1) * 0.02 - loop.time()))
        await ws.send(pcm[offset : offset + size].astype("<i2").tobytes())


async def http_get(port: int, raw_path: str) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP/1.1 GET, path sent exactly as given (no client-side normalisation)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {raw_path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def run_server(run: Callable[[Awaitable[Any]], Any], models: Any, config: Config, body: Callable[[Server], Awaitable[Any]],
               **kwargs: Any) -> Any:
    async def main() -> Any:
        async with Server(models, config, host="127.0.0.1", port=0, **{"token": "", **kwargs}) as server:
            return await body(server)

    return run(main())


# --------------------------------------------------------------------------
# A full turn
# --------------------------------------------------------------------------


def test_one_full_turn_events_and_audio_in_order(models: Any, config: Config, run: Any) -> None:
    """Audio in at 48 kHz, a spoken reply out at 48 kHz, every event where the protocol puts it."""
    wav = ASSETS / "questions" / "capital_of_france.wav"
    resampler = Resampler(16000, 48000)
    pcm = np.concatenate([resampler.process(load_pcm(wav)), resampler.flush()])

    async def body(server: Server) -> tuple[dict[str, Any], list[Message], int | None, int]:
        async with connect(server.ws_url) as ws:
            ready = await start_session(ws, input_rate=48000, output_rate=48000, client="test")
            sender = asyncio.create_task(stream(ws, pcm, 48000))
            collector = asyncio.create_task(until_closed(ws, 60))
            await sender
            await ws.send(json.dumps({"type": "input.end"}))
            messages = await collector
            code = ws.close_code
        await asyncio.sleep(0.2)
        return ready, messages, code, server.sessions

    ready, messages, code, sessions_left = run_server(run, models, config, body)
    assert ready["type"] == "session.ready" and ready["protocol"] == 1 and ready["session_id"]
    assert (ready["input_rate"], ready["output_rate"], ready["frame_ms"]) == (48000, 48000, 20)
    assert ready["budgets_ms"]["voice_to_voice"] == config.budgets.voice_to_voice_ms
    assert code == 1000 and sessions_left == 0

    evs = events(messages)
    kinds = [e["type"] for e in evs]
    assert kinds[-1] == "session.ended" and evs[-1]["reason"] == "input_ended"
    assert all("at_ms" in e for e in evs)
    for kind in ("speech.started", "speech.stopped", "transcript.final", "response.text.delta", "response.text.done",
                 "response.audio.start", "response.audio.end", "turn.metrics"):
        assert kind in kinds, (kind, kinds)
    first = {k: kinds.index(k) for k in set(kinds)}
    assert (first["speech.started"] < first["transcript.final"] < first["response.audio.start"]
            < kinds.index("response.audio.end") < kinds.index("turn.metrics") < len(kinds) - 1)
    assert all(e.get("turn_id") is not None for e in evs if e["type"] not in ("session.ended", "error"))
    final = next(e for e in evs if e["type"] == "transcript.final")
    assert word_error_rate(expected_text(wav), final["text"]) <= 0.2
    # The deltas after the last thrown-away early reply make up the reply text.
    last_reset = max([i for i, k in enumerate(kinds) if k == "response.cancelled"], default=-1)
    deltas = "".join(e["text"] for e in evs[last_reset + 1 :] if e["type"] == "response.text.delta")
    done = next(e for e in evs if e["type"] == "response.text.done")
    assert deltas.strip() == done["text"] and done["text"]
    metrics = next(e for e in evs if e["type"] == "turn.metrics")
    assert metrics["status"] == "completed" and metrics["interrupted"] is False
    assert 0 < metrics["voice_to_voice_ms"] < 10000
    assert metrics["latency_ms"]["voice_to_voice"] == metrics["voice_to_voice_ms"]
    assert "voice_to_voice" in metrics["budgets"]

    # Binary frames only between response.audio.start and .end; .end counts them.
    inside, counted, segments = False, 0, []
    times: list[float] = []
    for at, message in messages:
        if isinstance(message, bytes):
            assert inside, "audio outside response.audio.start/end"
            assert len(message) % 2 == 0
            counted += len(message) // 2
            times.append(at)
            continue
        event = json.loads(message)
        if event["type"] == "response.audio.start":
            assert not inside and event["sample_rate"] == 48000
            inside, counted = True, 0
        elif event["type"] == "response.audio.end":
            assert inside
            segments.append((event["samples"], counted))
            inside = False
    assert segments and all(a == b for a, b in segments)
    total = sum(a for a, _ in segments)
    audio = np.frombuffer(b"".join(m for _, m in messages if isinstance(m, bytes)), dtype="<i2")
    assert total == len(audio) and total > 48000 // 2
    assert np.abs(audio).max() > 1000
    # Paced for real time (jitter_buffer_ms ahead), not sent in one burst.
    seconds = total / 48000
    assert times[-1] - times[0] >= seconds - config.server.jitter_buffer_ms / 1000 - 0.3


# --------------------------------------------------------------------------
# Bad input never hurts the server or the other sessions
# --------------------------------------------------------------------------


def test_bad_frames_get_errors_or_close_codes_and_other_sessions_go_on(models: Any, run: Any) -> None:
    config = config_with("server.max_message_bytes=65536")

    async def refused_with(server: Server, first: str | bytes) -> tuple[dict[str, Any], int | None]:
        async with connect(server.ws_url) as ws:
            await ws.send(first)
            event = await next_event(ws)
            await until_closed(ws, 5)
            return event, ws.close_code

    async def body(server: Server) -> dict[str, Any]:
        results: dict[str, Any] = {}
        async with connect(server.ws_url) as bystander, connect(server.ws_url) as ws:
            assert (await start_session(bystander))["type"] == "session.ready"
            assert (await start_session(ws))["type"] == "session.ready"
            bad: list[str | bytes] = [
                "not json",
                "[1, 2]",
                json.dumps({"no": "type"}),
                json.dumps({"type": "hello"}),
                json.dumps({"type": "playback.position", "turn_id": "x", "samples": 3}),
                json.dumps({"type": "playback.position", "turn_id": 1, "samples": -1}),
                json.dumps({"type": "session.start", "protocol": 1}),
                b"\x01\x02\x03",
            ]
            for message in bad:
                await ws.send(message)
                event = await next_event(ws)
                results.setdefault("errors", []).append((event["type"], event["code"], event["fatal"]))
            results["unknown"] = results["errors"][3]
            await ws.send(json.dumps({"type": "session.end"}))
            results["ended"] = events(await until_closed(ws, 10))[-1]
            results["ended_code"] = ws.close_code

            results["binary_first"] = await refused_with(server, b"\x00\x00")
            results["wrong_protocol"] = await refused_with(server, json.dumps({"type": "session.start", "protocol": 2}))
            results["bad_rate"] = await refused_with(
                server, json.dumps({"type": "session.start", "protocol": 1, "input_rate": 1000})
            )

            async with connect(server.ws_url) as big:
                await start_session(big)
                await big.send(b"\x00" * 70000)
                await until_closed(big, 5)
                results["too_big"] = big.close_code

            async with connect(server.ws_url) as flood:
                await start_session(flood)
                second = np.zeros(16000, np.int16).tobytes()
                with pytest.raises(ConnectionClosed):
                    for _ in range(30):  # 30 s of audio as fast as the socket takes it
                        await flood.send(second)
                        await asyncio.sleep(0.01)
                results["flood"] = (events(await until_closed(flood, 5)), flood.close_code)

            # The bystander never noticed: it still answers, and ends normally.
            await bystander.send("still there?")
            results["bystander_error"] = await next_event(bystander)
            status, _, health = await http_get(server.port, "/healthz")
            results["health"] = (status, json.loads(health))
            await bystander.send(json.dumps({"type": "session.end"}))
            results["bystander_end"] = (events(await until_closed(bystander, 10))[-1], bystander.close_code)
        return results

    r = run_server(run, models, config, body)
    assert [e[:2] for e in r["errors"]] == [("error", "bad_message")] * 7 + [("error", "bad_audio")]
    assert not any(fatal for _, _, fatal in r["errors"])
    assert r["ended"]["type"] == "session.ended" and r["ended"]["reason"] == "session_end" and r["ended_code"] == 1000
    for case in ("binary_first", "wrong_protocol", "bad_rate"):
        event, code = r[case]
        assert (event["type"], event["code"], event["fatal"], code) == ("error", "protocol", True, 1008), case
    assert r["too_big"] == 1009
    flood_events, flood_code = r["flood"]
    assert flood_code == 1008 and flood_events[-1]["code"] == "input_rate" and flood_events[-1]["fatal"]
    assert r["bystander_error"]["code"] == "bad_message"
    assert r["health"][0] == 200 and r["health"][1]["status"] == "ok" and r["health"][1]["sessions"] == 1
    assert r["bystander_end"][0]["reason"] == "session_end" and r["bystander_end"][1] == 1000


# --------------------------------------------------------------------------
# Handshake refusals and limits
# --------------------------------------------------------------------------


def test_auth_refused_without_the_token(models: Any, config: Config, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def attempt(url: str, headers: dict[str, str] | None = None) -> int | str:
        try:
            async with connect(url, additional_headers=headers) as ws:
                return (await start_session(ws))["type"]
        except InvalidStatus as exc:
            return exc.response.status_code

    async def body(server: Server) -> dict[str, Any]:
        url = server.ws_url
        return {
            "none": await attempt(url),
            "wrong": await attempt(url, {"Authorization": "Bearer nope"}),
            "wrong_query": await attempt(f"{url}?token=nope"),
            "bearer": await attempt(url, {"Authorization": "Bearer s3cret"}),
            "query": await attempt(f"{url}?token=s3cret"),
            "health": (await http_get(server.port, "/healthz"))[0],
        }

    r = run_server(run, models, config, body, token="s3cret")
    assert (r["none"], r["wrong"], r["wrong_query"]) == (401, 401, 401)
    assert r["bearer"] == r["query"] == "session.ready"
    assert r["health"] == 200  # the page and the health check need no token

    monkeypatch.setenv("VOICE_ASSISTANT_TOKEN", "from-env")

    async def env_body(server: Server) -> tuple[Any, Any]:
        return await attempt(server.ws_url), await attempt(server.ws_url, {"Authorization": "Bearer from-env"})

    async def env_main() -> tuple[Any, Any]:
        async with Server(models, config, host="127.0.0.1", port=0) as server:  # token from the environment
            return await env_body(server)

    assert run(env_main()) == (401, "session.ready")


def test_origin_refused_unless_allowed(models: Any, config: Config, run: Any) -> None:
    async def attempt(url: str, origin: str | None) -> int | str:
        try:
            async with connect(url, origin=origin) as ws:  # type: ignore[arg-type]
                return (await start_session(ws))["type"]
        except InvalidStatus as exc:
            return exc.response.status_code

    async def body(server: Server) -> list[int | str]:
        own = f"http://127.0.0.1:{server.port}"
        return [await attempt(server.ws_url, o) for o in ("http://evil.example", own, None)]

    assert run_server(run, models, config, body) == [403, "session.ready", "session.ready"]

    listed = config_with('server.allowed_origins=["https://app.example"]')

    async def listed_body(server: Server) -> list[int | str]:
        return [await attempt(server.ws_url, o) for o in ("https://app.example", "http://evil.example")]

    assert run_server(run, models, listed, listed_body) == ["session.ready", 403]


def test_too_many_sessions_refused_clearly(models: Any, run: Any) -> None:
    config = config_with("server.max_sessions=2")

    async def body(server: Server) -> tuple[Any, ...]:
        async with connect(server.ws_url) as a, connect(server.ws_url) as b:
            await start_session(a)
            await start_session(b)
            async with connect(server.ws_url) as c:
                refusal = await next_event(c)
                await until_closed(c, 5)
                refused_code = c.close_code
            await a.send(json.dumps({"type": "session.end"}))
            await until_closed(a, 10)
            await asyncio.sleep(0.1)
            async with connect(server.ws_url) as d:  # a place is free again
                again = (await start_session(d))["type"]
        return refusal, refused_code, again

    refusal, code, again = run_server(run, models, config, body)
    assert refusal["type"] == "error" and refusal["code"] == "too_many_sessions" and refusal["fatal"] is True
    assert "2 sessions" in refusal["message"]
    assert code == 1013
    assert again == "session.ready"


def test_idle_session_is_closed(models: Any, run: Any) -> None:
    config = config_with("server.idle_timeout_s=1")

    async def body(server: Server) -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        async with connect(server.ws_url) as ws:
            await start_session(ws)
            # Messages keep it open...
            for _ in range(4):
                await asyncio.sleep(0.5)
                await ws.send(json.dumps({"type": "playback.position", "turn_id": 1, "samples": 0}))
            alive = ws.close_code is None
            # ...silence closes it.
            quiet_from = loop.time()
            messages = await until_closed(ws, 5)
            return alive, events(messages), ws.close_code, loop.time() - quiet_from

    alive, evs, code, waited = run_server(run, models, config, body)
    assert alive
    assert evs[-1]["type"] == "session.ended" and evs[-1]["reason"] == "idle_timeout"
    assert code == 1000 and 0.9 <= waited < 3


# --------------------------------------------------------------------------
# Disconnects, concurrency, shutdown
# --------------------------------------------------------------------------


def test_client_gone_mid_reply_leaves_no_task_and_no_vllm_request(models: Any, config: Config, run: Any) -> None:
    pcm = load_pcm(ASSETS / "questions" / "moon_fact.wav")

    async def body(server: Server) -> dict[str, Any]:
        before = set(asyncio.all_tasks())
        state: dict[str, Any] = {}
        ws = await connect(server.ws_url)
        await start_session(ws)
        sender = asyncio.create_task(stream(ws, np.concatenate([pcm, np.zeros(48000, np.int16)]), 16000))
        # The engine's requests as the first token comes out (a request is live then on any
        # machine; by the time the client has read that token a fast engine may be done).
        (connection,) = server._connections
        assert connection.session is not None
        connection.session.bus.subscribe(
            lambda e: state.setdefault("pending", models.llm.pending_requests()) if isinstance(e, LLMToken) else None
        )
        async with asyncio.timeout(30):
            while True:
                message = await ws.recv()
                if isinstance(message, str) and json.loads(message)["type"] == "response.text.delta":
                    break
        ws.transport.abort()  # gone: no close frame
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        async with asyncio.timeout(10):
            while server.sessions:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the engine settles the abort
        state["pending_after"] = models.llm.pending_requests()
        state["left"] = sorted(
            t.get_name() for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()
        )
        return state

    state = run_server(run, models, config, body)
    assert state["pending"] >= 1  # a request was live when the client vanished
    assert state["pending_after"] == 0
    assert state["left"] == []


def test_four_sessions_at_once_each_complete_their_turn(models: Any, config: Config, run: Any) -> None:
    names = ["capital_of_france", "spider_legs", "boiling_point", "largest_planet"]
    # The four questions end at the same moment (each padded at the front to the longest), so
    # their requests reach the engine together on any machine: left as recorded, they ended up
    # to 0.3 s apart, and an engine that answers in less than that would never batch them.
    ends = {name: speech_span(ASSETS / "questions" / f"{name}.wav")[1] for name in names}

    async def one(server: Server, name: str) -> RemoteSession:
        wav = ASSETS / "questions" / f"{name}.wav"
        session = await RemoteSession.open(server.ws_url, client=f"test-{name}")
        lead = np.zeros(int(round((max(ends.values()) - ends[name]) * 16000)), np.int16)
        await session.stream(np.concatenate([lead, load_pcm(wav)]))
        await session.end_input()
        await session.wait_closed(90)
        return session

    concurrent: list[int] = []

    async def body(server: Server) -> list[RemoteSession]:
        async def sample() -> None:  # how many vLLM requests run at once
            while True:
                concurrent.append(models.llm.pending_requests())
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        try:
            return list(await asyncio.gather(*(one(server, n) for n in names)))
        finally:
            sampler.cancel()

    sessions = run_server(run, models, config, body)
    # One engine, batching: the sessions' requests were in flight together.
    assert max(concurrent) >= 2, max(concurrent)
    assert len({s.session_id for s in sessions}) == 4
    v2v = []
    for name, session in zip(names, sessions):
        metrics = [m for m in session.metrics.values() if m["transcript"]]
        assert session.ended_reason == "input_ended" and session.close_code == 1000, name
        assert [m["status"] for m in metrics] == ["completed"], (name, session.metrics)
        # Four sessions share two cores and one Whisper thread: a late final may be the latest
        # partial (the asr_final budget's commit_partial), short of its last word.
        assert word_error_rate(expected_text(ASSETS / "questions" / f"{name}.wav"), metrics[0]["transcript"]) <= 0.4
        assert metrics[0]["reply"] and session.segments and session.binary_outside_segment == 0
        v2v.append(metrics[0]["voice_to_voice_ms"])
    print(f"\n4 concurrent sessions: voice-to-voice p50 {percentile(v2v, 50):.0f} ms, p95 {percentile(v2v, 95):.0f} ms, {v2v}")
    assert models.llm.pending_requests() == 0


def test_shutdown_tells_sessions_and_ends_in_flight_turns(models: Any, config: Config, run: Any) -> None:
    pcm = load_pcm(ASSETS / "questions" / "spider_legs.wav")

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        server = Server(models, config, host="127.0.0.1", port=0, token="")
        await server.start()
        session = await RemoteSession.open(server.ws_url)
        streaming = asyncio.create_task(session.stream(np.concatenate([pcm, np.zeros(16000 * 20, np.int16)])))
        await session.wait_for(lambda: bool(session.of_type("response.text.delta")), 30)
        began = loop.time()
        await server.shutdown(grace=1.0)
        took = loop.time() - began
        streaming.cancel()
        await asyncio.gather(streaming, return_exceptions=True)
        await session.wait_closed(5)
        try:
            await connect(server.ws_url, open_timeout=2)
            refused_after = False
        except OSError:
            refused_after = True
        return {"took": took, "session": session, "refused_after": refused_after}

    r = run(main())
    session: RemoteSession = r["session"]
    assert r["took"] < 1.0 + 4
    assert session.ended_reason == "shutdown" and session.close_code == 1001
    kinds = [e["type"] for _, e in session.events]
    assert kinds[-1] == "session.ended"
    # The turn was in flight: it ended (answered within the grace, or cancelled) and said so.
    assert "turn.metrics" in kinds
    assert not session.of_type("error")  # audio still arriving while it drained was not the client's fault
    assert r["refused_after"]
    assert models.llm.pending_requests() == 0


# --------------------------------------------------------------------------
# The browser client's files
# --------------------------------------------------------------------------


def test_static_files_health_and_no_way_out(models: Any, config: Config, run: Any, tmp_path: Path) -> None:
    web = tmp_path / "web"
    (web / "sub").mkdir(parents=True)
    (web / "index.html").write_text("<!doctype html><title>t</title>")
    (web / "app.js").write_text("console.log(1)")
    (web / "worklet.js").write_text("registerProcessor")
    (web / "style.css").write_text("body{}")
    (web / "sub" / "icon.svg").write_text("<svg/>")
    (web / ".secret").write_text("no")
    (tmp_path / "outside.txt").write_text("private")
    (web / "link.txt").symlink_to(tmp_path / "outside.txt")

    async def body(server: Server) -> dict[str, Any]:
        paths = ["/", "/index.html", "/app.js", "/worklet.js", "/style.css", "/sub/icon.svg", "/healthz",
                 "/../outside.txt", "/%2e%2e/outside.txt", "/sub/..%2F..%2Foutside.txt", "/.secret", "/link.txt",
                 "/missing.js", "/sub/", "/%00", "/ws/x"]
        return {p: await http_get(server.port, p) for p in paths}

    r = run_server(run, models, config, body, web_dir=web)
    assert r["/"][0] == 200 and r["/"][1]["content-type"].startswith("text/html") and b"doctype" in r["/"][2]
    assert r["/index.html"][2] == r["/"][2]
    for path in ("/app.js", "/worklet.js"):
        assert r[path][0] == 200 and r[path][1]["content-type"].startswith("text/javascript")
    assert r["/style.css"][1]["content-type"].startswith("text/css")
    assert r["/sub/icon.svg"][1]["content-type"] == "image/svg+xml"
    status, headers, health = r["/healthz"]
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(health)["status"] == "ok"
    for path in ("/../outside.txt", "/%2e%2e/outside.txt", "/sub/..%2F..%2Foutside.txt", "/.secret", "/link.txt",
                 "/missing.js", "/sub/", "/%00", "/ws/x"):
        assert r[path][0] == 404, path
        assert b"private" not in r[path][2]


# --------------------------------------------------------------------------
# Barge-in over the websocket
# --------------------------------------------------------------------------


def test_barge_in_cuts_at_the_playback_position_the_client_reported(models: Any, config: Config, run: Any) -> None:
    """The client says it has played less than the server's pacing clock thinks (its playback
    started late): the interruption is cut where the client really was, and the new question
    is answered."""
    rate = 22050
    question = load_pcm(ASSETS / "questions" / "why_sky_blue.wav")
    interruption = load_pcm(ASSETS / "questions" / "capital_of_france.wav")
    reported = rate // 10  # the client says: 0.1 s played, 0.6 s after the reply began

    async def body(server: Server) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        received: list[Message] = []
        state: dict[str, Any] = {"received": received}

        async def receive(ws: ClientConnection) -> None:
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    received.append((loop.time(), message))

        def seen(kind: str) -> bool:
            return any(isinstance(m, str) and json.loads(m)["type"] == kind for _, m in received)

        async with connect(server.ws_url) as ws:
            await start_session(ws, input_rate=16000, output_rate=rate)
            receiver = asyncio.create_task(receive(ws))
            await stream(ws, question, 16000)
            async with asyncio.timeout(30):  # the microphone stays open: silence until the reply plays
                while not seen("response.audio.start"):
                    await stream(ws, np.zeros(320, np.int16), 16000)
            state["audio_start"] = loop.time()
            await stream(ws, np.zeros(16000 * 6 // 10, np.int16), 16000)  # 0.6 s into the reply
            state["report_at"] = loop.time()
            await ws.send(json.dumps({"type": "playback.position", "turn_id": 1, "samples": reported}))
            await stream(ws, interruption, 16000)
            await stream(ws, np.zeros(16000, np.int16), 16000)
            await ws.send(json.dumps({"type": "input.end"}))
            await asyncio.wait_for(receiver, 60)
        return state

    state = run_server(run, models, config, body)
    timed = [(at, json.loads(m)) for at, m in state["received"] if isinstance(m, str)]
    evs = [e for _, e in timed]
    interrupted = [(at, e) for at, e in timed if e["type"] == "response.interrupted"]
    assert len(interrupted) == 1, [e["type"] for e in evs]
    got_at, event = interrupted[0]
    assert event["turn_id"] == 1 and event["by_turn"] == 2
    # Cut from the report, extrapolated at real time until the barge-in; the pacing clock
    # would have said about 0.5 s more.
    upper = reported + (got_at - state["report_at"]) * rate
    assert reported <= event["played_samples"] <= upper + 0.05 * rate
    assert event["played_samples"] < (got_at - state["audio_start"] - 0.2) * rate
    reply = next(e["text"] for e in evs if e["type"] == "response.text.delta" and e["turn_id"] == 1)
    assert reply.strip()  # the reply had begun
    ends = [e for e in evs if e["type"] == "response.audio.end" and e["turn_id"] == 1]
    assert ends and evs.index(ends[0]) > evs.index(event)  # the interrupted segment is closed after the stop
    metrics = {e["turn_id"]: e for e in evs if e["type"] == "turn.metrics"}
    assert metrics[1]["status"] == "interrupted" and metrics[1]["interrupted"] is True
    assert metrics[2]["status"] == "completed"
    assert word_error_rate("What is the capital of France?", metrics[2]["transcript"]) <= 0.2
    assert evs[-1]["type"] == "session.ended"


# --------------------------------------------------------------------------
# Hostile and clumsy clients: no slot leaks, bounded parsing, message rate
# --------------------------------------------------------------------------


async def health(port: int) -> dict[str, Any]:
    status, _, body = await http_get(port, "/healthz")
    assert status == 200
    return json.loads(body)


async def sessions_drop_to_zero(server: Server, timeout: float = 8) -> int:
    """What /healthz counts once every connection has had ``timeout`` to wind down."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        count = (await health(server.port))["sessions"]
        if count == 0 or loop.time() > deadline:
            return count
        await asyncio.sleep(0.1)


DEEP = "[" * 100_000 + "]" * 100_000  # 200 KB: the JSON decoder's recursion limit, ~1000 levels, is far below


def test_session_slots_are_released_however_a_connection_ends(
    models: Any, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each way a connection can end, then /healthz must count 0 again and every slot be usable.

    Faults inside the server (a bug while handling a message, while closing,
    in the handshake) are injected by patching the one method that fails."""
    from assistant.server import output as output_module
    from assistant.server import listener as server_module
    from assistant.server.v1 import codec as protocol_module

    config = config_with("server.max_sessions=3", "server.idle_timeout_s=2", "server.max_message_bytes=262144")
    original_parse = protocol_module.ProtocolV1.parse
    original_finish = output_module.WebSocketOutput.finish
    original_handshake = server_module.Server._check_handshake

    def parse(self: Any, text: str) -> Any:
        if "boom" in text:
            raise RuntimeError("a bug while handling a message")
        return original_parse(self, text)

    async def finish(self: Any, *args: Any) -> None:
        if getattr(self, "boom_on_close", False):
            raise RuntimeError("a bug while closing")
        await original_finish(self, *args)

    def check_handshake(self: Any, ws: Any, request: Any, query: str) -> Any:
        if "boom" in query:
            raise RuntimeError("a bug in the handshake")
        return original_handshake(self, ws, request, query)

    monkeypatch.setattr(protocol_module.ProtocolV1, "parse", parse)
    monkeypatch.setattr(output_module.WebSocketOutput, "finish", finish)
    monkeypatch.setattr(server_module.Server, "_check_handshake", check_handshake)

    async def ended_way(server: Server, way: str) -> tuple[str, Any]:
        """One connection ended ``way``; what it saw last, and its close code."""
        url = server.ws_url + ("?boom" if way == "handshake_bug" else "")
        try:
            ws = await connect(url)
        except InvalidStatus as exc:
            return way, exc.response.status_code
        if way == "before_start":
            await ws.close()
            return way, ws.close_code
        if way == "bad_start":
            await ws.send(DEEP)
            return way, (events(await until_closed(ws, 5))[-1]["code"], ws.close_code)
        ready = await start_session(ws)
        assert ready["type"] == "session.ready", ready
        if way == "deep_then_gone":  # the report: every one of these leaked its slot
            await ws.send(DEEP)
            first = await next_event(ws)
            ws.transport.abort()
            return way, (first["code"], first["fatal"])
        if way == "session_end":
            await ws.send(json.dumps({"type": "session.end"}))
        elif way == "aborted":
            ws.transport.abort()
            return way, None
        elif way == "idle":
            pass
        elif way == "too_big":
            await ws.send(b"\x00" * 300_000)
        elif way == "message_bug":
            await ws.send(json.dumps({"type": "boom"}))
        elif way == "close_bug":
            connection = next(c for c in server._connections if c.session and c.session.id == ready["session_id"])
            connection.output.boom_on_close = True  # type: ignore[union-attr]
            await ws.send(json.dumps({"type": "session.end"}))
        messages = await until_closed(ws, 10)
        evs = events(messages)
        return way, ((evs[-1]["type"], evs[-1].get("code") or evs[-1].get("reason")) if evs else None, ws.close_code)

    async def body(server: Server) -> dict[str, Any]:
        results: dict[str, Any] = {}
        ways = ["deep_then_gone", "deep_then_gone", "deep_then_gone", "before_start", "bad_start", "session_end",
                "aborted", "idle", "too_big", "message_bug", "close_bug", "handshake_bug"]
        for way in ways:
            _, seen = await ended_way(server, way)
            results.setdefault(way, []).append(seen)
            results.setdefault("left", []).append((way, await sessions_drop_to_zero(server)))
        # 13 clients at once against 3 slots: exactly 3 sessions, then every slot free again.
        async def one() -> str:
            async with connect(server.ws_url) as ws:
                try:
                    first = await start_session(ws)
                except ConnectionClosed:  # refused before session.start could even be sent
                    return "too_many_sessions" if ws.close_code == 1013 else f"closed {ws.close_code}"
                kind = first["type"] if first["type"] == "session.ready" else first["code"]
                await asyncio.sleep(0.5)
                return kind

        results["crowd"] = sorted(await asyncio.gather(*(one() for _ in range(13))))
        results["crowd_left"] = await sessions_drop_to_zero(server)
        async with connect(server.ws_url) as a, connect(server.ws_url) as b, connect(server.ws_url) as c:
            results["full_again"] = [(await start_session(ws))["type"] for ws in (a, b, c)]
        return results

    r = run_server(run, models, config, body)
    assert r["left"] == [(way, 0) for way, _ in r["left"]], r["left"]
    assert r["deep_then_gone"] == [("bad_message", False)] * 3
    assert r["bad_start"] == [("protocol", 1008)]
    assert r["session_end"] == [(("session.ended", "session_end"), 1000)]
    assert r["idle"] == [(("session.ended", "idle_timeout"), 1000)]
    assert r["too_big"] == [(None, 1009)]
    assert r["message_bug"] == [(("error", "internal"), 1011)]
    assert r["close_bug"][0][1] in (1000, 1011, 1006), r["close_bug"]
    assert r["handshake_bug"] == [500]
    assert r["crowd"] == ["session.ready"] * 3 + ["too_many_sessions"] * 10
    assert r["crowd_left"] == 0
    assert r["full_again"] == ["session.ready"] * 3


def test_deep_json_gets_an_error_and_the_session_goes_on(models: Any, config: Config, run: Any) -> None:
    async def body(server: Server) -> dict[str, Any]:
        async with connect(server.ws_url) as first:
            await first.send("[" * 30_000 + "]" * 30_000)
            refused = (await next_event(first), first)
            await until_closed(first, 5)
        async with connect(server.ws_url) as ws:
            await start_session(ws)
            await ws.send("[" * 30_000 + "]" * 30_000)
            deep = await next_event(ws)
            await ws.send(json.dumps({"type": "session.start", "protocol": True}))
            second = await next_event(ws)
            await ws.send(json.dumps({"type": "session.end"}))
            ended = events(await until_closed(ws, 10))[-1]
        return {"refused": (refused[0], refused[1].close_code), "deep": deep, "second": second, "ended": ended}

    r = run_server(run, models, config, body)
    event, code = r["refused"]
    assert (event["code"], event["fatal"], code) == ("protocol", True, 1008)
    assert "nested deeper than 32 levels" in event["message"]
    assert (r["deep"]["code"], r["deep"]["fatal"]) == ("bad_message", False)
    assert r["deep"]["message"] == "text frame nested deeper than 32 levels"
    assert r["second"]["code"] == "bad_message"  # the session answered the next message
    assert r["ended"]["reason"] == "session_end"


def test_protocol_true_or_float_is_refused(models: Any, config: Config, run: Any) -> None:
    async def body(server: Server) -> list[tuple[Any, ...]]:
        out = []
        for version in (True, 1.0):
            async with connect(server.ws_url) as ws:
                event = await start_session(ws, protocol=version)
                await until_closed(ws, 5)
                out.append((event["type"], event.get("code"), ws.close_code))
        return out

    assert run_server(run, models, config, body) == [("error", "protocol", 1008)] * 2


def test_a_max_size_audio_frame_the_docs_allow_is_accepted(models: Any, run: Any) -> None:
    """The docs allow any even length up to max_message_bytes: one such frame (8.19 s at 16 kHz)
    must not trip the input-rate check; a stream faster than the rate still does."""
    config = config_with("server.max_message_bytes=262144")

    async def body(server: Server) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for rate in (16000, 8000):
            async with connect(server.ws_url) as ws:
                await start_session(ws, input_rate=rate)
                await ws.send(b"\x00\x00" * (config.server.max_message_bytes // 2 - 1))
                await ws.send(json.dumps({"type": "session.end"}))
                evs = events(await until_closed(ws, 15))
                out[rate] = ([(e["type"], e.get("code") or e.get("reason")) for e in evs
                              if e["type"] in ("error", "session.ended")], ws.close_code)
        return out

    r = run_server(run, models, config, body)
    assert r[16000] == ([("session.ended", "session_end")], 1000)
    assert r[8000] == ([("session.ended", "session_end")], 1000)


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_a_message_flood_is_closed_and_does_not_starve_the_server(models: Any, run: Any, kind: str) -> None:
    """300,000 tiny frames as fast as the socket takes them: the flooder is closed with
    message_rate (1008) within its burst, and /healthz stays quick meanwhile."""
    config = config_with("server.max_messages_per_s=200", "server.message_burst=400")

    async def body(server: Server) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        stop = asyncio.Event()

        async def probe() -> None:
            while not stop.is_set():
                began = loop.time()
                await health(server.port)
                latencies.append(loop.time() - began)
                await asyncio.sleep(0.05)

        async with connect(server.ws_url) as bystander:
            await start_session(bystander)
            prober = asyncio.create_task(probe())
            async with connect(server.ws_url, max_queue=None) as flood:
                await start_session(flood)
                frame: str | bytes = json.dumps({"type": "playback.position", "turn_id": 1, "samples": 0}) \
                    if kind == "text" else b"\x00\x00"
                sent = 0
                with contextlib.suppress(ConnectionClosed):
                    for _ in range(300_000):
                        await flood.send(frame)
                        sent += 1
                flood_events = events(await until_closed(flood, 10))
                flood_code = flood.close_code
            await asyncio.sleep(0.3)
            stop.set()
            await prober
            await bystander.send(json.dumps({"type": "session.end"}))
            bystander_end = events(await until_closed(bystander, 10))[-1]
        return {"sent": sent, "events": flood_events, "code": flood_code, "latencies": latencies,
                "bystander": bystander_end}

    r = run_server(run, models, config, body)
    assert r["code"] == 1008, r["code"]
    last = r["events"][-1]
    assert (last["type"], last["code"], last["fatal"]) == ("error", "message_rate", True)
    assert "200 messages per second" in last["message"]
    assert r["latencies"] and max(r["latencies"]) < 1.0, r["latencies"]
    assert r["bystander"]["reason"] == "session_end"
