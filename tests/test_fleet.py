"""`voice-assistant fleet`: engine replicas behind vLLM's router, voice servers behind HAProxy.

The first tests check the pieces without models (the topology file, the
generated HAProxy configuration, which HAProxy itself validates). The last
brings up a real fleet on loopback (2 eager engine replicas of the bundled
model, vllm-router, 2 voice servers, HAProxy), talks to it through the
balancer as a browser would, kills a replica and a voice server, and checks
that nothing is left behind when it stops.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from assistant.client import RemoteSession
from assistant.config import load_config
from assistant.errors import ConfigError
from assistant.fleet import Address, Topology, haproxy_config, router_command
from assistant.telemetry import scrape, total
from tests.helpers import ASSETS, ROOT, cli_flags, free_port

CLI = [sys.executable, "-m", "assistant"]
QUESTION = ASSETS / "questions" / "capital_of_france.wav"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_topology_file_names_each_host(tmp_path: Path) -> None:
    t = Topology.from_file(write(tmp_path, """
policy: round_robin
balancer: 0.0.0.0:8765
router: 10.0.0.5:8090
engines: [10.0.0.5:8001, 10.0.0.6:8001]
servers: [10.0.0.7:8801, "[fd00::8]:8801"]
"""))
    assert t.engines == (Address("10.0.0.5", 8001), Address("10.0.0.6", 8001))
    assert t.servers[1] == Address("fd00::8", 8801) and t.servers[1].url() == "http://[fd00::8]:8801"
    assert t.balancer.url("ws", "/ws") == "ws://127.0.0.1:8765/ws"  # a wildcard bind is reached on loopback
    assert t.policy == "round_robin" and t.router_metrics == Address("10.0.0.5", 29000)
    command = router_command(t)
    assert command[command.index("--policy") + 1] == "round_robin"
    assert "http://10.0.0.5:8001" in command and "http://10.0.0.6:8001" in command


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("balancer: 1.2.3.4:80\nrouter: a:1\nengines: [a:2]\n", "servers is missing"),
        ("balancer: 1.2.3.4:80\nrouter: a:1\nengines: [a:2]\nservers: [b]\n", "servers[0]"),
        ("balancer: 1.2.3.4:99999\nrouter: a:1\nengines: [a:2]\nservers: [b:3]\n", "balancer"),
        ("balancer: x:1\nrouter: a:1\nengines: []\nservers: [b:3]\n", "engines"),
        ("balancer: x:1\nrouter: a:1\nengines: [a:2]\nservers: [b:3]\npolicy: fastest\n", "policy"),
        ("balancer: x:1\nrouter: a:1\nengines: [a:2]\nservers: [b:3]\nrouters: [c:1]\n", "'routers'"),
        ("[not, a, mapping]\n", "expected a mapping"),
    ],
)
def test_a_bad_topology_file_names_the_bad_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Topology.from_file(write(tmp_path, text))
    assert named in str(caught.value)


def test_the_generated_haproxy_config_is_valid_and_checks_readiness(tmp_path: Path) -> None:
    t = Topology.on_loopback(engines=2, servers=3, port=free_port())
    text = haproxy_config(t)
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    checked = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "option httpchk GET /readyz" in text and "balance leastconn" in text
    assert text.count("server serve-") == 2 * len(t.servers)  # the ready set, and the live set for refusals
    assert len(set(t.engines) | set(t.servers) | {t.router, t.router_metrics}) == 2 + 3 + 2


def test_bad_fleet_arguments_get_one_line(tmp_path: Path) -> None:
    for args in (["--engines", "0"], ["--topology", str(tmp_path / "missing.yaml")]):
        done = subprocess.run([*CLI, "fleet", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr


# ---- a real fleet on loopback ----------------------------------------------------------


def requests_served(url: str) -> float:
    return total(scrape(url + "/metrics"), "vllm:e2e_request_latency_seconds_count")


def kill_tree(pid: int) -> None:
    """SIGKILL a part as a crash would: the process and everything it started."""
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    logs = tmp_path_factory.mktemp("fleet")
    out = logs / "fleet.out"
    command = [*CLI, "fleet", "--engines", "2", "--servers", "2", "--port", str(free_port()), "--logs", str(logs),
               "--ready-timeout", "500", *cli_flags()]
    with out.open("w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 560
    url = None
    while time.monotonic() < deadline and proc.poll() is None and url is None:
        match = re.search(r"fleet ready in \d+ s: (ws://\S+)", out.read_text(errors="replace"))
        url = match.group(1) if match else None
        time.sleep(0.5)
    try:
        assert url is not None, f"the fleet did not start (exit {proc.poll()}):\n{out.read_text()[-3000:]}"
        parts = json.loads((logs / "fleet.json").read_text())["parts"]
        yield {"url": url, "proc": proc, "parts": parts, "out": out}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)


@pytest.mark.slow
def test_a_fleet_answers_keeps_a_session_on_one_replica_survives_deaths_and_stops_clean(fleet: Any, run: Any) -> None:
    from audio.files import read_wav

    pcm = read_wav(QUESTION)[0]
    error_phrase = load_config(None, []).llm.error_phrase.strip()
    engines = [p for p in fleet["parts"] if p["kind"] == "engines"]
    servers = [p for p in fleet["parts"] if p["kind"] == "servers"]
    tree = [psutil.Process(fleet["proc"].pid), *psutil.Process(fleet["proc"].pid).children(recursive=True)]
    assert len(tree) >= 1 + 2 * 2 + 1 + 2 + 1  # fleet, engines (wrapper + vLLM each), router, servers, haproxy

    async def ask(session: RemoteSession) -> dict[str, Any]:
        answered = len(session.metrics)
        await session.stream(pcm)
        await session.stream_silence_until(lambda: len(session.metrics) > answered or session.closed, max_s=90)
        assert len(session.metrics) > answered, f"no answer; events: {[e for _, e in session.events][-5:]}"
        return list(session.metrics.values())[-1]

    async def talk() -> tuple[list[dict[str, Any]], str, str]:
        before = {e["url"]: requests_served(e["url"]) for e in engines}
        session = await RemoteSession.open(fleet["url"], client="fleet-test")
        turns = [await ask(session), await ask(session)]
        served = {e["url"]: requests_served(e["url"]) - before[e["url"]] for e in engines}
        holder = next(s for s in servers if _sessions(s["url"]) == 1)
        # Both of the session's turns went to one replica (consistent_hash on X-Session-ID).
        assert sorted(served.values()) == [0, 2], served
        replica = next(e for e in engines if served[e["url"]] == 2)
        # A crash of that replica and of the session's voice server.
        kill_tree(replica["pid"])
        kill_tree(holder["pid"])
        await session.wait_closed(30)
        assert session.closed
        # The client reconnects through the balancer, as the browser page does, and is answered.
        again = None
        for _ in range(20):
            try:
                again = await RemoteSession.open(fleet["url"], client="fleet-test-again")
                break
            except Exception:
                await asyncio.sleep(0.5)
        assert again is not None, "no voice server took the reconnected client"
        replies = []
        for _ in range(3):  # the router drops the dead replica at its next health check (1 s)
            turn = await ask(again)
            replies.append(turn["reply"])
            if turn["status"] == "completed" and turn["reply"].strip() != error_phrase:
                break
        await again.close()
        return turns, replies[-1], holder["url"]

    turns, last_reply, dead_server = run(talk())
    assert all(t["status"] == "completed" and t["transcript"] for t in turns)
    assert last_reply.strip() and last_reply.strip() != error_phrase, "the reconnected client was not answered"

    # SIGTERM stops every part: no process of the fleet is left.
    fleet["proc"].send_signal(signal.SIGTERM)
    fleet["proc"].wait(timeout=120)
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], alive
    assert "Traceback" not in fleet["out"].read_text(errors="replace")


def _sessions(url: str) -> int:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as reply:
            return int(json.loads(reply.read())["sessions"])
    except OSError:
        return -1
