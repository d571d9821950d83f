"""A real OpenAI Realtime client for the tests: the official ``openai`` SDK.

Runs in its own virtual environment (the SDK needs ``websockets<16``; the
project runs a newer one), started by tests/test_realtime.py as
``sdk_client.py PLAN_JSON``. It plays one scenario against the server and
prints one JSON line per thing that happened: ``{"t", "in": event}`` for
every server event as received (raw, for the test to validate), ``{"t",
"mark": name}`` for what the client did, and ``{"mark": "speech_end",
"sent_t"}``: when the client sent the sample the server says the speech
ended at. Audio files are raw PCM16 at 24 kHz.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from typing import Any

from openai import AsyncOpenAI

CHUNK = 24000 * 2 * 40 // 1000  # 40 ms of PCM16 at 24 kHz
SILENCE = bytes(CHUNK)


def log(**fields: Any) -> None:
    print(json.dumps({"t": time.monotonic(), **fields}), flush=True)


class Client:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.queue = bytearray()
        self.mic_on = False
        self.sent_at: list[float] = []  # when each 40 ms chunk of the input stream was sent

    def sent_time(self, ms: int) -> float | None:
        """When the client sent the input's sample at ``ms`` (from its first appended sample)."""
        index = ms // 40
        return self.sent_at[index] if 0 <= index < len(self.sent_at) else None

    async def read(self) -> None:
        while True:
            raw = await self.conn.recv_bytes()
            event = json.loads(raw)
            self.conn.parse_event(raw)  # the SDK's own parsing must take it too
            log(**{"in": event})
            if event["type"] == "input_audio_buffer.speech_stopped":
                # Where the server heard the last voiced sample, on this client's clock
                # (what the browser client measures its voice to voice from).
                log(mark="speech_end", audio_end_ms=event["audio_end_ms"], sent_t=self.sent_time(event["audio_end_ms"]))
            self.events.append(event)
            self.changed.set()

    async def wait(self, kind: str, since: int = 0, timeout: float = 60, **match: Any) -> dict[str, Any]:
        """The first event of ``kind`` (from index ``since``) whose fields match."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[since:]:
                    if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                        return event
                self.changed.clear()
                await self.changed.wait()

    async def send(self, event: dict[str, Any]) -> None:
        log(mark="sent", event={k: v for k, v in event.items() if k != "audio"})
        await self.conn.send(event)

    async def raw(self, text: str) -> None:
        log(mark="sent_raw", text=text)
        await self.conn._connection.send(text)

    async def mic(self) -> None:
        """A microphone: what play() queued, else silence, at real-time pace."""
        start = time.monotonic()
        sent = 0
        while True:
            if self.mic_on:
                voiced = bool(self.queue)
                chunk = bytes(self.queue[:CHUNK]) if voiced else SILENCE
                del self.queue[:CHUNK]
                self.sent_at.append(time.monotonic())
                await self.conn.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()})
                if voiced and not self.queue:
                    log(mark="clip_end")
            sent += 1
            await asyncio.sleep(max(0.0, start + sent * 0.04 - time.monotonic()))

    def play(self, path: str) -> None:
        self.queue += open(path, "rb").read()
        log(mark="clip_start")

    def session(self, turn_detection: dict[str, Any] | None) -> dict[str, Any]:
        fmt = {"type": "audio/pcm", "rate": 24000}
        return {"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["audio"],
            "audio": {"input": {"format": fmt, "turn_detection": turn_detection}, "output": {"format": fmt}}}}


async def spoken(c: Client, plan: dict[str, Any]) -> None:
    await c.send(c.session({"type": "server_vad", "interrupt_response": True}))
    await c.wait("session.updated")
    c.mic_on = True
    c.play(plan["question"])
    await c.wait("response.done", timeout=90)


WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                          "required": ["city"]}}


async def tool(c: Client, plan: dict[str, Any]) -> None:
    """A spoken question with a tool the client runs: the call, its output, the spoken answer."""
    update = c.session({"type": "server_vad", "interrupt_response": True})
    update["session"].update(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"})
    await c.send(update)
    await c.wait("session.updated")
    c.mic_on = True
    c.play(plan["question"])
    called = await c.wait("response.done", timeout=90)
    for item in called["response"]["output"]:
        if item["type"] == "function_call":
            city = json.loads(item["arguments"]).get("city", "")
            await c.send({"type": "conversation.item.create", "item": {
                "type": "function_call_output", "call_id": item["call_id"],
                "output": f"{plan['forecast']} in {city}."}})
    mark = len(c.events)
    await c.send({"type": "response.create"})
    await c.wait("response.done", since=mark, timeout=90)


async def barge(c: Client, plan: dict[str, Any]) -> None:
    await c.send(c.session({"type": "semantic_vad"}))
    await c.wait("session.updated")
    c.mic_on = True
    c.play(plan["question"])
    first = await c.wait("response.output_audio.delta", timeout=90)
    t0 = time.monotonic()
    await asyncio.sleep(1.5)
    mark = len(c.events)
    c.play(plan["interruption"])
    await c.wait("input_audio_buffer.speech_started", since=mark, timeout=30)
    # What agents-js does on speech_started, twice as measured: cancel, then
    # truncate at the wall-clock time since the first delta.
    played = int((time.monotonic() - t0) * 1000)
    for _ in range(2):
        await c.send({"type": "response.cancel"})
        await c.send({"type": "conversation.item.truncate", "item_id": first["item_id"], "content_index": 0,
                      "audio_end_ms": played})
    await c.wait("conversation.item.truncated", since=mark)
    done = await c.wait("response.done", since=mark, timeout=30)
    await c.wait("response.done", since=c.events.index(done) + 1, timeout=90)


async def manual(c: Client, plan: dict[str, Any]) -> None:
    await c.send(c.session(None))
    await c.wait("session.updated")
    # Bad events: each gets an error, and the session goes on.
    for text in ["{not json", json.dumps({"type": "bogus.event"}), json.dumps([1, 2]),
                 json.dumps({"type": "input_audio_buffer.append", "audio": "***"}),
                 json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}),
                 json.dumps({"type": "input_audio_buffer.commit"}),
                 json.dumps({"type": "response.cancel"}),
                 json.dumps({"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 5})]:
        mark = len(c.events)
        await c.raw(text)
        await c.wait("error", since=mark, timeout=10)
    # A manual turn: the whole question, committed, then response.create.
    audio = open(plan["question"], "rb").read()
    for offset in range(0, len(audio), 4 * CHUNK):
        await c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(audio[offset:offset + 4 * CHUNK]).decode()})
        await asyncio.sleep(0.05)
    mark = len(c.events)
    await c.send({"type": "input_audio_buffer.commit"})
    await c.send({"type": "response.create"})
    done = await c.wait("response.done", since=mark, timeout=90)
    item = done["response"]["output"][0]["id"]
    mark = len(c.events)
    await c.send({"type": "conversation.item.truncate", "item_id": item, "content_index": 0, "audio_end_ms": 600})
    await c.wait("conversation.item.truncated", since=mark)
    # A text item answered in audio, cancelled while it plays.
    mark = len(c.events)
    await c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": plan["text"]}]}})
    await c.send({"type": "response.create"})
    await c.wait("response.created", since=mark)
    await c.send({"type": "response.create"})  # one at a time: an error
    await c.wait("error", since=mark)
    await c.wait("response.output_audio.delta", since=mark, timeout=60)
    await c.send({"type": "response.cancel"})
    await c.send({"type": "response.cancel"})  # a repeat: tolerated
    await c.wait("response.done", since=mark, timeout=30)
    # The session goes on: another text item, answered whole.
    mark = len(c.events)
    await c.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": plan["text2"]}]}})
    await c.send({"type": "response.create"})
    await c.wait("response.done", since=mark, timeout=90)


async def main() -> None:
    plan = json.loads(sys.argv[1])
    client = AsyncOpenAI(api_key=plan["key"], base_url=plan["base_url"])
    async with client.realtime.connect(model="local-model") as conn:
        c = Client(conn)
        reader = asyncio.create_task(c.read())
        mic = asyncio.create_task(c.mic())
        await c.wait("session.created", timeout=10)
        await {"spoken": spoken, "barge": barge, "manual": manual, "tool": tool}[plan["scenario"]](c, plan)
        log(mark="done")
        mic.cancel()
        reader.cancel()


asyncio.run(main())
