"""The OpenAI Realtime endpoint (/v1/realtime) against real clients and the real models.

The clients are the official ones, unmodified: the ``openai`` Python SDK
(``client.realtime.connect``) in its own virtual environment, since it
needs ``websockets<16`` (tests/realtime_clients/sdk_client.py), and the
Agents SDK's ``@openai/agents-realtime`` in Node. Every server event they
receive is validated with the SDK's own ``RealtimeServerEvent`` models.
No test depends on what the model answers or how long.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter

from assistant.config import Config, load_config
from assistant.server.listener import Server
from audio.resample import Resampler
from helpers import ASSETS, TEST_OVERRIDES, expected_text, load_pcm, word_error_rate, words

pytestmark = pytest.mark.slow

CLIENTS = Path(__file__).resolve().parent / "realtime_clients"
SDK_VENV = Path(os.environ.get("REALTIME_SDK_VENV", CLIENTS / ".venv"))


def sdk_python() -> Path:
    """The SDK client's interpreter: tests/realtime_clients/.venv, made on first use
    (scripts/install.sh makes it too)."""
    python = SDK_VENV / "bin" / "python"
    check = [str(python), "-c", "import openai, websockets; assert int(websockets.__version__.split('.')[0]) < 16"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(SDK_VENV)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                        str(CLIENTS / "requirements.txt")], check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"cannot install the openai SDK client ({exc}); run scripts/install.sh with PyPI reachable")
    return python


def validated(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The server events the client received, each one valid for the SDK's own models."""
    from openai.types.realtime import RealtimeServerEvent

    adapter = TypeAdapter(RealtimeServerEvent)
    events = [line["in"] for line in lines if "in" in line]
    for event in events:
        adapter.validate_python(event)
    return events


def pcm24(tmp_path: Path, name: str, folder: str = "questions") -> Path:
    """A committed question as raw PCM16 at 24 kHz, the rate of this wire."""
    resampler = Resampler(16000, 24000)
    pcm = np.concatenate([resampler.process(load_pcm(ASSETS / folder / f"{name}.wav")), resampler.flush()])
    path = tmp_path / f"{name}.pcm"
    path.write_bytes(pcm.astype("<i2").tobytes())
    return path


async def run_sdk_client(server: Server, plan: dict[str, Any], timeout: float = 240) -> list[dict[str, Any]]:
    plan = {"base_url": f"http://127.0.0.1:{server.port}/v1", "key": "test-key", **plan}
    process = await asyncio.create_subprocess_exec(
        str(sdk_python()), str(CLIENTS / "sdk_client.py"), json.dumps(plan),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]
    assert process.returncode == 0, stderr.decode()[-3000:]
    assert lines and lines[-1].get("mark") == "done"
    return lines


def serve(run: Any, models: Any, config: Config | None, body: Any, **kwargs: Any) -> Any:
    # The turn budget (20 s until the whole reply is synthesized, then cancel) would cut a long
    # answer on a slow shared CPU; these tests are about the wire, not how long the model talks.
    config = load_config(overrides=[*TEST_OVERRIDES, "budgets.turn_ms=120000"])

    async def main() -> Any:
        async with Server(models, config, host="127.0.0.1", port=0, **{"token": "", **kwargs}) as server:
            return await body(server)

    return run(main())


async def hold_connection(server: Server) -> Any:
    """The server's connection object for the one session the client opens (to read its history)."""
    async with asyncio.timeout(20):
        while not server._connections:
            await asyncio.sleep(0.05)
    return next(iter(server._connections))


def sdk_lines_and_history(run: Any, models: Any, plan: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The SDK client's lines for ``plan``, and its session's history once it is done."""

    async def body(server: Server) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        holder = asyncio.create_task(hold_connection(server))
        lines = await run_sdk_client(server, plan)
        connection = await holder
        return lines, connection.session.conversation.turns

    return serve(run, models, None, body)


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def assert_response_order(events: list[dict[str, Any]], response_id: str) -> None:
    """One response's events in OpenAI's order (livekit-agents documents it; clients rely on it)."""
    mine = [e for e in events if e.get("response_id") == response_id
            or e.get("response", {}).get("id") == response_id]
    order = kinds(mine)
    assert order[:3] == ["response.created", "response.output_item.added", "response.content_part.added"], order
    assert order[-4:] == ["response.output_audio_transcript.done", "response.content_part.done",
                          "response.output_item.done", "response.done"], order
    deltas = [e for e in mine if e["type"] == "response.output_audio_transcript.delta"]
    done = next(e for e in mine if e["type"] == "response.output_audio_transcript.done")
    assert "".join(d["delta"] for d in deltas).strip() == done["transcript"]


# --------------------------------------------------------------------------
# The openai SDK
# --------------------------------------------------------------------------


def test_sdk_spoken_turn_and_voice_to_voice_next_to_ws(models: Any, config: Config, run: Any, tmp_path: Path) -> None:
    """A spoken question in at 24 kHz under server VAD: its transcript, a spoken reply out, every
    event valid and in order. The same question over /ws, for the voice-to-voice next to it."""
    question = pcm24(tmp_path, "capital_of_france")

    async def body(server: Server) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        holder = asyncio.create_task(hold_connection(server))
        lines = await run_sdk_client(server, {"scenario": "spoken", "question": str(question)})
        connection = await holder
        return lines, connection.session.report.to_json()[0]

    lines, report = serve(run, models, config, body)
    events = validated(lines)
    order = kinds(events)
    assert order[0] == "session.created" and "session.updated" in order
    assert "error" not in order, of(events, "error")
    first = {k: order.index(k) for k in set(order)}
    assert (first["input_audio_buffer.speech_started"] < first["input_audio_buffer.speech_stopped"]
            < first["input_audio_buffer.committed"] < first["conversation.item.input_audio_transcription.completed"]
            < first["response.created"] < first["response.output_audio.delta"] < first["response.done"])
    user = of(events, "conversation.item.input_audio_transcription.completed")[0]
    assert user["item_id"] == of(events, "input_audio_buffer.committed")[0]["item_id"]
    assert word_error_rate(expected_text(ASSETS / "questions" / "capital_of_france.wav"), user["transcript"]) <= 0.2
    done = of(events, "response.done")[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["output_tokens"] > 0, done
    assert_response_order(events, done["id"])
    audio = b"".join(__import__("base64").b64decode(e["delta"]) for e in of(events, "response.output_audio.delta"))
    assert len(audio) // 2 > 24000 // 2 and np.abs(np.frombuffer(audio, "<i2")).max() > 1000
    from helpers import transcribe

    heard = transcribe(models, np.frombuffer(audio, "<i2"), 24000)
    transcript = of(events, "response.output_audio_transcript.done")[-1]["transcript"]
    assert word_error_rate(transcript, heard) <= 0.35, (transcript, heard)

    # Voice to voice, as the client sees it (as the browser measures it): from when it sent the
    # question's last voiced sample (where speech_stopped says it was) to the first reply audio.
    # Not from the end of the clip: its trailing silence outlasts the reply on a fast machine.
    speech_end = next(line["sent_t"] for line in lines if line.get("mark") == "speech_end")
    assert speech_end is not None, "speech_stopped named a sample the client never sent"
    first_audio = next(line["t"] for line in lines if line.get("in", {}).get("type") == "response.output_audio.delta")
    realtime_ms = (first_audio - speech_end) * 1000
    ws_ms, ws_report = ws_voice_to_voice(run, models, config)
    print(f"\nvoice to voice, client side (last voiced sample sent -> first reply audio): realtime "
          f"{realtime_ms:.0f} ms, /ws {ws_ms:.0f} ms; server report: realtime {report['voice_to_voice_ms']} ms, "
          f"/ws {ws_report['voice_to_voice_ms']} ms")
    print(f"user: {user['transcript']!r}\nassistant: {transcript!r}\nheard back: {heard!r}")
    assert 0 < realtime_ms < 10000 and 0 < ws_ms < 10000


def ws_voice_to_voice(run: Any, models: Any, config: Config) -> tuple[float, dict[str, Any]]:
    """The same question over /ws at 24 kHz, paced the same way: (client-side ms, the server's report).

    The client side runs from when the question's last voiced sample was sent (turn.metrics'
    speech_end_input_ms, as the browser reads it) to the first reply audio."""
    from websockets.asyncio.client import connect

    resampler = Resampler(16000, 24000)
    pcm = np.concatenate([resampler.process(load_pcm(ASSETS / "questions" / "capital_of_france.wav")),
                          resampler.flush()]).astype("<i2")
    chunk = 960

    async def body(server: Server) -> tuple[float, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        holder = asyncio.create_task(hold_connection(server))
        async with connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "session.start", "protocol": 1, "input_rate": 24000,
                                      "output_rate": 24000}))
            connection = await holder
            first_audio: list[float] = []
            metrics: list[dict[str, Any]] = []
            sent_at: list[float] = []  # when each 40 ms chunk was sent

            async def receive() -> None:
                async for message in ws:
                    if isinstance(message, bytes) and not first_audio:
                        first_audio.append(loop.time())
                    if isinstance(message, str) and json.loads(message)["type"] == "turn.metrics":
                        metrics.append(json.loads(message))
                        return

            receiver = asyncio.create_task(receive())
            start, sent = loop.time(), 0
            silence = np.zeros(chunk, "<i2")
            while not receiver.done():
                data = pcm[sent * chunk:(sent + 1) * chunk] if sent * chunk < len(pcm) else silence
                sent_at.append(loop.time())
                await ws.send(data.tobytes())
                sent += 1
                await asyncio.sleep(max(0.0, start + sent * 0.04 - loop.time()))
            speech_end = sent_at[int(metrics[0]["speech_end_input_ms"] // 40)]
            return (first_audio[0] - speech_end) * 1000, connection.session.report.to_json()[0]

    return serve(run, models, config, body)


def test_sdk_function_call_with_the_default_model_then_the_spoken_answer(
    models: Any, config: Config, run: Any, tmp_path: Path
) -> None:
    """The official SDK declares get_weather and names it in tool_choice; a spoken question makes the
    default model call it (under its schema) with the city heard; the client's output goes back and
    the answer is spoken. Every server event validates against the SDK's own types."""
    forecast = "Sunny and 18 degrees Celsius"
    plan = {"scenario": "tool", "question": str(pcm24(tmp_path, "weather_london", "tools")), "forecast": forecast}
    lines, history = sdk_lines_and_history(run, models, plan)
    events = validated(lines)
    assert "error" not in kinds(events), of(events, "error")
    heard = of(events, "conversation.item.input_audio_transcription.completed")[0]["transcript"]
    first, second = [e["response"] for e in of(events, "response.done")][:2]
    # The first response is the call: one function_call item, no message, valid JSON naming the city heard.
    assert first["status"] == "completed" and [o["type"] for o in first["output"]] == ["function_call"]
    call = first["output"][0]
    assert call["name"] == "get_weather" and call["status"] == "completed"
    city = json.loads(call["arguments"])["city"]
    assert isinstance(city, str) and city.strip() and city.strip().lower() in heard.lower(), (city, heard)
    deltas = [e["delta"] for e in of(events, "response.function_call_arguments.delta") if e["call_id"] == call["call_id"]]
    done = [e for e in of(events, "response.function_call_arguments.done") if e["call_id"] == call["call_id"]]
    assert "".join(deltas) == done[0]["arguments"] == call["arguments"]
    assert not [e for e in of(events, "response.output_audio.delta") if e["response_id"] == first["id"]]
    # The second answers, spoken, with the output in its prompt.
    assert second["status"] == "completed" and [o["type"] for o in second["output"]] == ["message"]
    assert [e for e in of(events, "response.output_audio.delta") if e["response_id"] == second["id"]]
    assert second["output"][0]["content"][0]["transcript"].strip()
    assert_response_order(events, second["id"])
    roles = [(t["role"], t.get("content")) for t in history]
    tool_at = roles.index(("tool", f"{forecast} in {city}."))
    assert roles[tool_at - 1][0] == "assistant" and "tool_calls" in history[tool_at - 1]
    assert roles[tool_at + 1][0] == "assistant" and roles[tool_at + 1][1]


def test_sdk_barge_in_cancel_and_truncate_keep_only_the_heard_words(
    models: Any, config: Config, run: Any, tmp_path: Path
) -> None:
    """Speech over the reply: the server stops it (response.done cancelled, turn_detected); the
    client's cancel + truncate pair (sent twice, as agents-js does) is tolerated; the history keeps
    only what was heard; the interrupting question is answered."""
    plan = {"scenario": "barge", "question": str(pcm24(tmp_path, "why_sky_blue")),
            "interruption": str(pcm24(tmp_path, "capital_of_france"))}

    lines, history = sdk_lines_and_history(run, models, plan)
    events = validated(lines)
    assert "error" not in kinds(events), of(events, "error")
    dones = of(events, "response.done")
    first, second = dones[0]["response"], dones[-1]["response"]
    assert first["status"] == "cancelled" and first["status_details"]["reason"] == "turn_detected"
    assert second["status"] == "completed"
    assert len(of(events, "conversation.item.truncated")) == 2
    full = next(e["transcript"] for e in of(events, "response.output_audio_transcript.done")
                if e["response_id"] == first["id"])
    # Only what was heard stays: nothing (the first audio may be the budget's "One moment."),
    # or the first words of the reply, marked interrupted; never the whole reply.
    replies = [t for t in history if t["role"] == "assistant"]
    assert all(words(t["content"]) != words(full) for t in replies)
    for cut in [t for t in replies if t["interrupted"]]:
        assert words(full)[: len(words(cut["content"]))] == words(cut["content"])
        assert len(words(cut["content"])) < len(words(full))
    users = [t["content"] for t in history if t["role"] == "user"]
    assert word_error_rate("What is the capital of France?", users[-1]) <= 0.2


def test_sdk_manual_turns_text_items_cancel_and_bad_events(
    models: Any, config: Config, run: Any, tmp_path: Path
) -> None:
    """turn_detection null: commit + response.create answers the buffer; a truncate cuts the
    history; a text item is answered in audio and cancelled; bad events get errors and the
    session goes on to answer another text item."""
    plan = {"scenario": "manual", "question": str(pcm24(tmp_path, "capital_of_france")),
            "text": "Tell me about the history of Rome.", "text2": "What is two plus two?"}

    lines, history = sdk_lines_and_history(run, models, plan)
    events = validated(lines)
    errors = [e["error"]["code"] for e in of(events, "error")]
    assert errors == ["invalid_json", "invalid_value", "invalid_json", "invalid_value", "invalid_value",
                      "input_audio_buffer_commit_empty", "response_cancel_not_active",
                      "item_truncate_invalid_item_id", "conversation_already_has_active_response"], errors
    assert "input_audio_buffer.speech_started" not in kinds(events)  # no server VAD
    user = of(events, "conversation.item.input_audio_transcription.completed")[0]
    assert word_error_rate("What is the capital of France?", user["transcript"]) <= 0.2
    dones = [e["response"] for e in of(events, "response.done")]
    assert [d["status"] for d in dones] == ["completed", "cancelled", "completed"]
    assert dones[1]["status_details"]["reason"] == "client_cancelled"
    for done in (dones[0], dones[2]):
        assert_response_order(events, done["id"])
    assert any(e["response_id"] == dones[1]["id"] for e in of(events, "response.output_audio.delta"))
    # The history: the spoken question, the reply cut at 600 ms, the text items.
    contents = [(t["role"], t["content"]) for t in history]
    assert contents[0][0] == "user" and word_error_rate("What is the capital of France?", contents[0][1]) <= 0.2
    full = of(events, "response.output_audio_transcript.done")[0]["transcript"]
    first_reply = history[1]
    assert first_reply["role"] == "assistant" and first_reply["interrupted"] is True
    assert len(words(first_reply["content"])) < len(words(full))
    assert ("user", plan["text"]) in contents and ("user", plan["text2"]) in contents


# --------------------------------------------------------------------------
# The Agents SDK (Node)
# --------------------------------------------------------------------------


def agents_client() -> Path:
    """tests/realtime_clients with @openai/agents-realtime installed (npm ci on first use)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed for the Agents SDK client (apt-get install nodejs npm)")
    if not (CLIENTS / "node_modules" / "@openai" / "agents-realtime").is_dir():
        try:
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CLIENTS, check=True,
                           capture_output=True, timeout=300)
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"cannot install @openai/agents-realtime from npm ({exc}); run scripts/install.sh online")
    return CLIENTS / "agents_client.mjs"


def test_agents_sdk_spoken_turn(models: Any, config: Config, run: Any, tmp_path: Path) -> None:
    """The Node Agents SDK's transport (its own session.update, Bearer auth, no subprotocol) hears a
    spoken question answered in audio; every event it got is valid and none is an error."""
    script = agents_client()
    question = pcm24(tmp_path, "capital_of_france")

    async def body(server: Server) -> list[dict[str, Any]]:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime?model=local-model"
        process = await asyncio.create_subprocess_exec(
            "node", str(script), url, str(question), cwd=CLIENTS,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 200)
        assert process.returncode == 0, stderr.decode()[-3000:]
        return [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]

    lines = serve(run, models, config, body, token="test-key")
    check_agents_lines(lines, "What is the capital of France?")


def check_agents_lines(lines: list[dict[str, Any]], question: str) -> list[dict[str, Any]]:
    """Every event the Agents SDK client saw is valid, none an error; a spoken answer came."""
    for line in lines:  # what the Agents SDK client saw, for a failure's report
        print(json.dumps(line)[:300])
    assert lines[-1].get("mark") == "done", lines[-5:]
    assert not [line for line in lines if line.get("mark") == "error"]
    events = validated(lines)
    order = kinds(events)
    assert order[0] == "session.created" and "session.updated" in order and "error" not in order
    user = of(events, "conversation.item.input_audio_transcription.completed")[0]
    assert word_error_rate(question, user["transcript"]) <= 0.2
    done = of(events, "response.done")[-1]["response"]
    assert done["status"] == "completed" and of(events, "response.output_audio.delta")
    assert_response_order(events, done["id"])
    return events


def test_agents_sdk_runs_a_forced_tool_and_the_answer_is_spoken(
    models: Any, config: Config, run: Any, tmp_path: Path
) -> None:
    """The Agents SDK's tool flow: a RealtimeAgent with get_weather and tool_choice naming it; the SDK
    runs the call the server streams, sends its output and asks again; the answer is spoken."""
    script = agents_client()
    question = pcm24(tmp_path, "weather_london", "tools")

    async def body(server: Server) -> list[dict[str, Any]]:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime?model=local-model"
        process = await asyncio.create_subprocess_exec(
            "node", str(script), url, str(question), "--tool", cwd=CLIENTS,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 200)
        assert process.returncode == 0, stderr.decode()[-3000:]
        return [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]

    lines = serve(run, models, config, body, token="test-key")
    events = check_agents_lines(lines, "Is it going to rain in London tomorrow?")
    (start,) = [line for line in lines if line.get("mark") == "tool_start"]
    (end,) = [line for line in lines if line.get("mark") == "tool_end"]
    assert start["name"] == "get_weather" and isinstance(json.loads(start["arguments"])["city"], str)
    assert end["result"].startswith("Sunny, 18 degrees Celsius in")
    dones = [e["response"] for e in of(events, "response.done")]
    assert [o["type"] for o in dones[0]["output"]] == ["function_call"]
    assert [o["type"] for o in dones[-1]["output"]] == ["message"]
