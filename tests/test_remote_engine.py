"""The language model as a service: a real vLLM server, started once.

`voice-assistant engine` starts vLLM's OpenAI-compatible server on the
bundled model (CPU), shared by every test here; the sessions reach it
through a small TCP relay on loopback, which the tests can take down and
bring back (an engine that goes away and returns) and which records each
request's head (the session header). Everything else is real: the
``openai`` client, the server, its ``/metrics``, the voice server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from assistant.config import load_config
from assistant.engine.remote import RemoteModel, RemoteSettings
from assistant.telemetry import total
from assistant.session import Session
from audio.framing import file_source
from helpers import ASSETS, ROOT, cli_flags, expected_text, free_port, load_pcm, word_error_rate
from pipeline.frames import LLMDone, StageError
from pipeline.playback import TimelineOutput

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "assistant"]
QUESTION = ASSETS / "questions" / "capital_of_france.wav"


def _started(command: list[str], log: Path, pattern: str, timeout_s: float) -> tuple[subprocess.Popen[str], str]:
    """Start a command (output to ``log``) and wait for a line matching ``pattern``."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return proc, match.group(1)
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{command[3]} did not start (exit {proc.poll()}): {log.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def engine_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`voice-assistant engine` on a free port, until the module ends."""
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    command = [*CLI, "engine", "--port", str(free_port()), "--ready-timeout", "400", *cli_flags()]
    proc, url = _started(command, log, r"engine ready in \d+ s at (http://\S+/v1)", 420)
    try:
        yield url
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"engine processes outlived `voice-assistant engine`: {alive}"


class Relay:
    """A TCP relay to the engine that can go down and come back on its port,
    and keeps the head of each HTTP request it passed on."""

    def __init__(self, target: str) -> None:
        host, port = target.split("//")[1].split("/")[0].split(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.heads: list[str] = []
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)

    async def down(self) -> None:
        """Refuse new connections and cut the open ones (the engine died)."""
        if self._server is not None:
            self._server.close()
            pipes = list(self._pipes)
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, record=True), self._pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass
        finally:
            self._pipes.discard(task)
            for w in (writer, up_writer):
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool = False) -> None:
        while data := await reader.read(65536):
            if record and data[:4] in (b"POST", b"GET "):
                self.heads.append(data.split(b"\r\n\r\n", 1)[0].decode("latin-1"))
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()


@pytest.fixture
def relay(engine_url: str, run: Any) -> Iterator[Relay]:
    relay = Relay(engine_url)
    run(relay.up())
    yield relay
    run(relay.down())


def remote_config(url: str, *overrides: str) -> Any:
    return load_config(overrides=["llm.engine=remote", f"llm.url={url}", *overrides])


def remote_models(models: Any, config: Any) -> Any:
    """The loaded speech models with the remote engine as the language model."""
    return dataclasses.replace(models, config=config, llm=RemoteModel(RemoteSettings.from_config(config)))


def converse(models: Any, config: Any, run: Any, wav: Path = QUESTION) -> tuple[Session, list[Any]]:
    output = TimelineOutput(config.audio.output_rate, 16000)
    session = Session(models, config, output)
    events: list[Any] = []
    session.bus.subscribe(events.append)
    run(session.run(file_source(load_pcm(wav), 16000, config.audio.frame_ms, realtime=True, start=session.origin)))
    return session, events


def test_a_spoken_question_is_answered_by_the_server(models: Any, engine_url: str, relay: Relay, run: Any) -> None:
    config = remote_config(relay.url, "llm.min_tokens=4")
    remote = remote_models(models, config)
    run(remote.llm.connect())
    assert remote.llm.health()["state"] == "up" and remote.llm.model_name
    session, events = converse(remote, config, run)
    (turn,) = session.report.to_json()
    assert turn["status"] == "completed"
    assert word_error_rate(expected_text(QUESTION), turn["transcript"]) <= 0.2
    assert turn["reply"] and turn["reply_audio_seconds"] > 0.3
    assert not [e for e in events if isinstance(e, StageError)]
    # The history holds the exchange, as with the local engine.
    assert [m["role"] for m in session.conversation.messages()] == ["system", "user", "assistant"]
    # Every request carried the session's id, for a router's session affinity,
    # tagged with this process's so that two voice servers' "s1" differ.
    posts = [h for h in relay.heads if h.startswith("POST /v1/chat/completions")]
    assert posts and all(f"x-session-id: {remote.llm.tag}-{session.id}" in h.lower() for h in posts)
    # Nothing left running on the server (read directly: the relay needs the loop).
    assert RemoteModel(RemoteSettings.from_config(remote_config(engine_url))).pending_requests() == 0


def test_cancelling_mid_reply_aborts_the_request_on_the_server(engine_url: str, run: Any) -> None:
    config = remote_config(engine_url, "llm.min_tokens=60", "llm.max_tokens=80")
    llm = RemoteModel(RemoteSettings.from_config(config))
    run(llm.connect())
    before = llm.metrics()
    messages = [{"role": "system", "content": config.llm.system_prompt}, {"role": "user", "content": "Tell me a story."}]
    got: list[str] = []

    async def reply() -> None:
        async for delta, _ in llm.stream(messages, "cancel-test", "s1"):
            got.append(delta)

    async def cancel_after_first_tokens() -> None:
        task = asyncio.create_task(reply())
        while len(got) < 3 and not task.done():
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run(cancel_after_first_tokens())
    assert len(got) >= 3, "the reply streamed before it was cancelled"
    deadline = time.monotonic() + 5
    while (after := llm.metrics()) and total(after, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert total(after, "vllm:num_requests_running") == 0, "the request still runs on the server"
    generated = total(after, "vllm:generation_tokens_total") - total(before, "vllm:generation_tokens_total")
    assert generated < 60, f"the server went on generating after the stream closed ({generated} tokens)"
    # It never finished as a whole reply would (stop or length).
    for reason in ("stop", "length"):
        key = "vllm:request_success_total"
        assert total(after, key, finished_reason=reason) == total(before, key, finished_reason=reason)
    run(llm.aclose())


def test_an_engine_that_goes_away_gets_an_apology_and_comes_back(models: Any, relay: Relay, run: Any) -> None:
    config = remote_config(relay.url)
    remote = remote_models(models, config)
    run(remote.llm.connect())
    run(relay.down())
    session, events = converse(remote, config, run)
    (turn,) = session.report.to_json()
    errors = [e for e in events if isinstance(e, StageError)]
    assert errors and errors[0].stage == "llm" and "unreachable" in errors[0].message
    assert turn["reply"] == config.llm.error_phrase and turn["reply_audio_seconds"] > 1, "the apology was spoken"
    done = [e for e in events if isinstance(e, LLMDone)]
    assert done and done[0].finish_reason == "error"
    assert [m["role"] for m in session.conversation.messages()] == ["system"], "no apology in the history"
    assert remote.llm.health()["state"] == "down"

    run(relay.up())  # the engine is back: the background probe notices

    async def until_up() -> None:
        deadline = time.monotonic() + 15
        while remote.llm.health()["state"] != "up" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    run(until_up())
    assert remote.llm.health()["state"] == "up"
    session, events = converse(remote, config, run)
    (turn,) = session.report.to_json()
    assert turn["status"] == "completed" and turn["reply"] != config.llm.error_phrase
    assert not [e for e in events if isinstance(e, StageError)]


def test_serve_with_a_remote_engine_answers_without_loading_vllm(engine_url: str, tmp_path: Path) -> None:
    """The real `serve` and `client` commands: the voice server starts in
    seconds (no vLLM in it) and a spoken question gets a spoken answer."""
    port = free_port()
    started = time.monotonic()
    command = [*CLI, "serve", "--port", str(port), "--set", "llm.engine=remote", "--set", f"llm.url={engine_url}"]
    serve, _ = _started(command, tmp_path / "serve.log", r"(serving on) ", 120)
    try:
        ready_s = time.monotonic() - started
        modules = {m.path for m in psutil.Process(serve.pid).memory_maps()}
        assert not [p for p in modules if "/vllm/" in p or "libtorch" in p], "serve loaded vLLM or torch"
        assert not psutil.Process(serve.pid).children(), "serve started an engine process"
        import httpx

        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
        assert health["engine"]["kind"] == "remote" and health["engine"]["state"] == "up"
        client = subprocess.run(
            [*CLI, "client", "--url", f"ws://127.0.0.1:{port}", "--input", str(QUESTION)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert client.returncode == 0, client.stderr[-2000:]
        shown = client.stdout + client.stderr
        assert re.search(r"assistant: \S+", shown), shown[-2000:]
        assert ready_s < 60, f"serve took {ready_s:.0f} s to start with a remote engine"
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)


def test_engine_flags_are_the_local_engines(config: Any) -> None:
    """`voice-assistant engine` runs what the in-process engine would."""
    from assistant.engine.local import engine_args
    from assistant.engine.server import server_command

    weights = Path("/tmp/weights")
    command = server_command(config, weights, "127.0.0.1", 8000, ["--tensor-parallel-size", "2"])
    args = engine_args(config, weights)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for key in ("model", "dtype", "max_model_len", "max_num_seqs", "seed"):
        flag = "--" + key.replace("_", "-")
        assert command[command.index(flag) + 1] == str(args[key])
    assert ("--enforce-eager" in command) == bool(args["enforce_eager"])
    spec = args["speculative_config"]
    assert ("--speculative-config" in command) == (spec is not None)
    if spec is not None:
        assert json.loads(command[command.index("--speculative-config") + 1]) == spec
    assert command[-2:] == ["--tensor-parallel-size", "2"], "extra flags pass through to vLLM"


def test_a_forced_call_through_the_server_is_valid_json_under_the_tools_schema(engine_url: str, run: Any) -> None:
    """A named tool_choice on vLLM's server (its structured outputs): the default model writes
    the call's arguments, streamed as tool-call deltas, valid under the schema."""
    from pipeline.llm import CallPiece
    from pipeline.tools import ToolChoice, ToolSpec

    config = remote_config(engine_url)
    llm = RemoteModel(RemoteSettings.from_config(config))
    run(llm.connect())
    weather = ToolSpec("get_weather", "Current weather for a city.",
                       {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    messages = [{"role": "system", "content": config.llm.system_prompt},
                {"role": "user", "content": "What is the weather like in London?"}]

    async def call() -> tuple[list[CallPiece], list[str]]:
        pieces: list[CallPiece] = []
        text: list[str] = []
        async for item in llm.stream(messages, "tool-test", "s1", [weather], ToolChoice("named", "get_weather")):
            if isinstance(item, CallPiece):
                pieces.append(item)
            else:
                text.append(item[0])
        return pieces, text

    pieces, text = run(call())
    run(llm.aclose())
    assert pieces and {p.index for p in pieces} == {0} and not "".join(text).strip()
    assert pieces[0].name == "get_weather" and pieces[0].call_id
    arguments = json.loads("".join(p.arguments for p in pieces))
    assert isinstance(arguments, dict) and isinstance(arguments.get("city"), str)


def test_the_engine_parses_calls_only_for_a_model_that_makes_them(config: Any) -> None:
    from assistant.engine.server import server_command

    plain = server_command(config, Path("/tmp/w"), "127.0.0.1", 8000, [])
    assert "--enable-auto-tool-choice" not in plain
    trained = load_config(overrides=["llm.tool_parser=hermes"])
    command = server_command(trained, Path("/tmp/w"), "127.0.0.1", 8000, [])
    assert command[command.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in command
