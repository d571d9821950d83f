"""The tools this process runs itself, for real and without models: an MCP
server over stdio and over streamable HTTP (examples/mcp_demo_server.py,
through the official SDK), a command, an HTTP endpoint; failures are
ToolFailed with the reason; the config names the bad key."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assistant.config import load_config
from assistant.errors import ConfigError, ModelError
from assistant.tools import ToolFailed, Tools, load_tools

from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, str(ROOT / "examples" / "mcp_demo_server.py")]


def _config(tools: dict[str, Any]) -> Any:
    overrides = [f"tools.{key}={json.dumps(value)}" for key, value in tools.items()]
    return load_config(overrides=overrides)


def test_an_mcp_server_over_stdio_offers_its_tools_and_answers_calls() -> None:
    async def main() -> None:
        tools = Tools(_config({"mcp": [{"command": DEMO, "keywords": {"opening_hours": ["open", "hours"]}}]}))
        await tools.start()
        try:
            names = {spec.name: spec for spec in tools.specs}
            assert {"opening_hours", "get_weather", "set_timer", "switch_lights"} <= set(names)
            hours = names["opening_hours"]
            assert hours.keywords == ("open", "hours") and "day" in hours.parameters["properties"]
            assert "closed" in await tools.call("opening_hours", {"day": "Monday"})
            with pytest.raises(ToolFailed, match="not a day of the week"):
                await tools.call("opening_hours", {"day": "Someday"})
            assert tools.timeout_s("opening_hours") == 8.0
        finally:
            await tools.close()

    asyncio.run(main())


def test_an_mcp_server_over_streamable_http_and_one_that_is_not_there() -> None:
    port = free_port()
    proc = subprocess.Popen([*DEMO, "--http", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)

        async def main() -> None:
            tools = Tools(_config({"mcp": [{"url": f"http://127.0.0.1:{port}/mcp"},
                                           {"url": f"http://127.0.0.1:{free_port()}/mcp"}]}))
            await tools.start()  # the second is unreachable: left out, logged
            try:
                assert "set_timer" in {s.name for s in tools.specs}
                assert "5 minutes" in await tools.call("set_timer", {"minutes": 5})
            finally:
                await tools.close()

        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def endpoint() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status = 500 if body.get("city") == "Nowhere" else 200
            payload = json.dumps({"city": body.get("city"), "sky": "clear"}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/weather"
    server.shutdown()


def test_declared_http_and_command_tools(endpoint: str) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    script = "import json, sys; a = json.load(sys.stdin); sys.exit(3) if a.get('fail') else print('hello', a['who'])"
    config = _config({"declared": [
        {"name": "weather", "parameters": schema, "http": {"url": endpoint}},
        {"name": "greet", "command": [sys.executable, "-c", script], "timeout_s": 2},
        {"name": "missing", "command": ["/nonexistent/tool"]},
    ]})
    tools = load_tools(config)
    assert tools is not None and [s.name for s in tools.specs] == ["weather", "greet", "missing"]
    assert tools.timeout_s("greet") == 2.0

    async def main() -> None:
        assert json.loads(await tools.call("weather", {"city": "Oslo"})) == {"city": "Oslo", "sky": "clear"}
        with pytest.raises(ToolFailed, match="answered 500"):
            await tools.call("weather", {"city": "Nowhere"})
        assert await tools.call("greet", {"who": "you"}) == "hello you"
        with pytest.raises(ToolFailed, match="exited with 3"):
            await tools.call("greet", {"fail": True})
        with pytest.raises(ToolFailed, match="cannot run"):
            await tools.call("missing", {})

    asyncio.run(main())
    assert load_tools(load_config()) is None  # none configured: no toolbox at all


def test_tool_config_errors_name_the_bad_key() -> None:
    cases = [
        ({"declared": [{"name": "x", "http": {"url": "http://a"}, "command": ["y"]}]},
         "tools.declared[0]: give either http or command"),
        ({"declared": [{"name": "bad name!", "command": ["y"]}]}, "tools.declared[0].name"),
        ({"declared": [{"name": "x", "http": {"url": "ftp://a"}}]}, "tools.declared[0].http.url"),
        ({"declared": [{"name": "x", "command": ["y"], "parameters": {"type": "string"}}]},
         "tools.declared[0].parameters"),
        ({"declared": [{"name": "x", "command": ["y"], "colour": "red"}]}, "tools.declared[0].colour"),
        ({"mcp": [{}]}, "tools.mcp[0]: give either command"),
        ({"choice": "sometimes"}, "tools.choice"),
    ]
    for tools, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            _config(tools)


def test_an_opt_in_model_is_joined_from_its_wheels_and_checked_against_its_pin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from assistant import tool_models

    site = tmp_path / "site"
    blobs = [b"GGUF" + bytes(range(200)), b"more weights" * 10]
    for n, blob in enumerate(blobs, 1):
        data = site / f"fake_model_part{n}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"part{n:02d}.bin").write_bytes(blob)
    whole = b"".join(blobs)
    model = tool_models.OptInModel("fake-model", "A fake", "fake-model-part", "1.0", 2, len(whole),
                                   hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(tool_models.MODELS, "fake-model", model)
    cache = tmp_path / "cache"
    missing = r"fake-model is not installed \(part 1 of 2 is missing\).*tool_models install fake-model"
    with pytest.raises(ModelError, match=missing):
        tool_models.gguf("fake-model", cache, progress=lambda _: None)
    monkeypatch.syspath_prepend(str(site))
    path = tool_models.gguf("fake-model", cache, progress=lambda _: None)
    assert path.read_bytes() == whole and (cache / "NOTICE.fake-model").is_file()
    assert tool_models.gguf("fake-model", cache, progress=lambda _: None) == path  # once
    # A part that is not the pinned file is refused, and nothing is left behind.
    (site / "fake_model_part2" / "data" / "part02.bin").write_bytes(b"tampered")
    path.unlink()
    with pytest.raises(ModelError, match="not the pinned file"):
        tool_models.gguf("fake-model", cache, progress=lambda _: None)
    assert not path.exists() and not list(cache.glob(".fake-model.gguf.*"))
