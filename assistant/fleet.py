"""``voice-assistant fleet``: the topology of docs/deploy.md section 4, started with one command.

::

    clients --ws--> HAProxy --> serve x M --http--> vllm-router --> voice-assistant engine x N

Every part is the real thing: N vLLM OpenAI servers (``voice-assistant
engine``), vLLM's router (the ``vllm-router`` package) in front of them,
M voice servers (``voice-assistant serve`` with ``llm.engine: remote`` on
the router) and Debian's HAProxy, its configuration generated here, in
front of those. Nothing of ours sits on a request's path but the voice
servers themselves.

On one machine (``--engines N --servers M --port P``) the parts listen on
free loopback ports and the balancer on ``P``. Across machines a topology
file gives each part's address; the same command on each host starts the
parts whose address is that host's (``--only`` narrows them to some kinds)
and waits for the rest to answer.

The parts start in dependency order, each waited for until it answers its
own readiness check (an engine's ``/health``, the router's ``/health``, a
voice server's ``/readyz``, the balancer's ``/healthz`` through to a voice
server); then one line gives the ``ws://`` and ``http://`` URLs. A part
that dies is reported and left to the others (that is what the router and
the balancer are for); SIGTERM or Ctrl+C stops every part in reverse order,
a second one kills them, and no process is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .config import Config
from .errors import ConfigError, UserError

KINDS: Final = ("engines", "router", "servers", "balancer")
POLICIES: Final = ("consistent_hash", "round_robin", "random", "power_of_two", "cache_aware")
HEALTH_CHECK_MS: Final = 500  # the balancer's check of each voice server's /readyz (LiveKit refreshes at 0.5 s)
STOP_TIMEOUT_S: Final = 20.0  # a part's graceful stop (sessions told, engine stopped) before it is killed


class FleetError(UserError):
    """A part did not come up, or the topology cannot be started."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: object, key: str) -> Address:
        if not isinstance(text, str) or ":" not in text:
            raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
        host, _, port = text.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{key}: {port!r} is not a port (1-65535)")
        return cls(host.strip("[]"), int(port))

    @property
    def connect(self) -> str:
        """Where to reach it (a wildcard bind is reached on loopback)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else "::1" if self.host == "::" else self.host
        return f"[{host}]" if ":" in host else host

    def url(self, scheme: str = "http", path: str = "") -> str:
        return f"{scheme}://{self.connect}:{self.port}{path}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Topology:
    """Where each part listens."""

    engines: tuple[Address, ...]
    router: Address
    router_metrics: Address
    servers: tuple[Address, ...]
    balancer: Address
    policy: str = "consistent_hash"

    @classmethod
    def on_loopback(cls, engines: int, servers: int, port: int, host: str = "127.0.0.1",
                    policy: str = "consistent_hash") -> Topology:
        """N engines and M servers on free loopback ports, the balancer on ``host:port``."""
        if engines < 1 or servers < 1:
            raise UserError("--engines and --servers: at least 1 each")
        ports = _free_ports(engines + servers + 2)
        loop = "127.0.0.1"
        return cls(
            engines=tuple(Address(loop, p) for p in ports[:engines]),
            router=Address(loop, ports[engines]),
            router_metrics=Address(loop, ports[engines + 1]),
            servers=tuple(Address(loop, p) for p in ports[engines + 2:]),
            balancer=Address(host, port),
            policy=policy,
        )

    @classmethod
    def from_file(cls, path: Path) -> Topology:
        """A YAML file (examples/fleet.yaml): balancer, router, engines, servers, policy."""
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"--topology {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--topology {path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--topology {path}: expected a mapping of balancer, router, engines, servers")
        unknown = set(data) - {"balancer", "router", "router_metrics", "engines", "servers", "policy"}
        if unknown:
            raise ConfigError(f"--topology {path}: unknown key {sorted(unknown)[0]!r}")
        for key in ("balancer", "router", "engines", "servers"):
            if key not in data:
                raise ConfigError(f"--topology {path}: {key} is missing")
        lists = {}
        for key in ("engines", "servers"):
            items = data[key]
            if not isinstance(items, list) or not items:
                raise ConfigError(f"{key}: expected a list of HOST:PORT")
            lists[key] = tuple(Address.parse(item, f"{key}[{i}]") for i, item in enumerate(items))
        router = Address.parse(data["router"], "router")
        policy = data.get("policy", "consistent_hash")
        if policy not in POLICIES:
            raise ConfigError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
        metrics = data.get("router_metrics")
        return cls(
            engines=lists["engines"],
            router=router,
            router_metrics=Address.parse(metrics, "router_metrics") if metrics else Address(router.host, 29000),
            servers=lists["servers"],
            balancer=Address.parse(data["balancer"], "balancer"),
            policy=policy,
        )


# ---- the parts' commands and the balancer's configuration --------------------


def router_command(t: Topology) -> list[str]:
    """vllm-router over the engines; it drops a dead replica at its next health check (1 s)."""
    return [
        _router_binary(), "--host", t.router.host, "--port", str(t.router.port),
        "--worker-urls", *(e.url() for e in t.engines),
        "--policy", t.policy,
        "--prometheus-host", t.router_metrics.host, "--prometheus-port", str(t.router_metrics.port),
        "--health-check-interval-secs", "1", "--health-failure-threshold", "1", "--health-success-threshold", "1",
        "--health-check-timeout-secs", "2",
        "--log-level", "warning",
    ]


def haproxy_config(t: Topology) -> str:
    """HAProxy in front of the voice servers.

    New connections go to the server with the fewest (``leastconn``: a
    websocket is one long session) among those whose ``/readyz`` says they
    have room; a server that is full or slow is out of rotation within
    :data:`HEALTH_CHECK_MS` and back as soon as it has room, its open
    sessions untouched. When none has room, a live one takes the connection
    and answers it with the protocol's "too many sessions" (backend
    ``voice_full``, checked on ``/healthz``), so the client hears why
    instead of an HTTP 503.
    """
    check = f"inter {HEALTH_CHECK_MS} fastinter {HEALTH_CHECK_MS} downinter {HEALTH_CHECK_MS} rise 1 fall 1"
    servers = "\n".join(f"    server serve-{i + 1} {s.connect}:{s.port} check" for i, s in enumerate(t.servers))
    return f"""# Generated by `voice-assistant fleet` (assistant/fleet.py).
global
    maxconn 4096
    log stderr format short local0 notice

defaults
    mode http
    log global
    option dontlognull
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # a websocket's life after the upgrade (server.idle_timeout_s ends idle ones first)
    timeout tunnel 1h
    timeout http-request 10s
    retries 2
    option redispatch
    retry-on conn-failure empty-response

frontend voice
    bind {t.balancer.host or '0.0.0.0'}:{t.balancer.port}
    use_backend voice_full if {{ nbsrv(voice) lt 1 }}
    default_backend voice

backend voice
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server {check}
{servers}

backend voice_full
    balance leastconn
    option httpchk GET /healthz
    http-check expect status 200
    default-server {check}
{servers}
"""


def _router_binary() -> str:
    here = Path(sys.executable).with_name("vllm-router")
    found = str(here) if here.exists() else shutil.which("vllm-router")
    if found is None:
        raise FleetError("vllm-router is not installed (pip install vllm-router; scripts/install.sh does)")
    return found


def _haproxy_binary() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
    if found is None:
        raise FleetError("haproxy is not installed (Debian: apt-get install haproxy; scripts/install.sh does)")
    return found


# ---- running the parts ---------------------------------------------------------


@dataclass
class Part:
    """One process of the fleet, in its own process group, its output in a log file."""

    name: str
    kind: str
    url: str  # where it serves (an engine's and the router's root, a voice server's page)
    command: list[str]
    ready_url: str
    log: Path
    local: bool = True  # its address is this host's: started here
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    reported: bool = field(default=False)

    def start(self) -> None:
        with self.log.open("ab") as out:
            try:
                self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
            except OSError as exc:
                raise FleetError(f"{self.name}: cannot start {self.command[0]}: {exc.strerror}") from None

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``url`` answers 200 (a readiness check)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # noqa: S310 (our own parts)
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Fleet:
    """The parts this host runs, started in order and stopped in reverse."""

    def __init__(self, topology: Topology, *, only: tuple[str, ...], child_flags: list[str], logs: Path,
                 ready_timeout_s: float, say: Any = None) -> None:
        self.topology = topology
        self.only = only
        self.child_flags = child_flags
        self.logs = logs
        self.ready_timeout_s = ready_timeout_s
        self.say = say or (lambda message: print(message, file=sys.stderr, flush=True))
        self.parts: list[Part] = []
        self.stopping = 0

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "assistant", *args, *self.child_flags]

    def plan(self) -> list[tuple[str, list[Part], list[str]]]:
        """Per kind: the parts started here, and every URL of that kind to wait for."""
        t = self.topology
        engines = [Part(f"engine-{i + 1}", "engines", e.url(), self._cli("engine", "--host", e.host, "--port", str(e.port),
                                                      "--ready-timeout", str(int(self.ready_timeout_s))),
                        e.url(path="/health"), self.logs / f"engine-{i + 1}.log") for i, e in enumerate(t.engines)]
        router_url = t.router.url(path="/v1")
        routers = [Part("router", "router", t.router.url(), router_command(t), t.router.url(path="/health"), self.logs / "router.log")]
        servers = [Part(f"serve-{i + 1}", "servers", s.url(), self._cli("serve", "--host", s.host, "--port", str(s.port), "--set",
                                                     "llm.engine=remote", "--set", f"llm.url={router_url}"),
                        s.url(path="/readyz"), self.logs / f"serve-{i + 1}.log") for i, s in enumerate(t.servers)]
        config = self.logs / "haproxy.cfg"
        balancers = [Part("balancer", "balancer", t.balancer.url("ws", "/ws"), [_haproxy_binary(), "-W", "-db", "-f", str(config)],
                          t.balancer.url(path="/healthz"), self.logs / "haproxy.log")]
        for part, address in zip([*engines, *routers, *servers, *balancers],
                                 [*t.engines, t.router, *t.servers, t.balancer]):
            part.local = is_local(address.host)
        return [("engines", engines, [p.ready_url for p in engines]),
                ("router", routers, [p.ready_url for p in routers]),
                ("servers", servers, [p.ready_url for p in servers]),
                ("balancer", balancers, [p.ready_url for p in balancers])]

    def start(self) -> float:
        """Start this host's parts, kind by kind, each kind waited for; the seconds it took."""
        started = time.monotonic()
        (self.logs / "haproxy.cfg").write_text(haproxy_config(self.topology), encoding="utf-8")
        for kind, parts, urls in self.plan():
            mine = [p for p in parts if p.local] if kind in self.only else []
            for part in mine:
                self.say(f"starting {part.name} ({shlex.join(part.command[:6])} ...), log {part.log}")
                part.start()
                self.parts.append(part)
            self._write_parts()
            self._wait(kind, mine, urls)
            if self.stopping:
                break
        return time.monotonic() - started

    def _write_parts(self) -> None:
        """``fleet.json`` in the logs folder: each part this host runs, its URL, process and log."""
        import json

        parts = [{"name": p.name, "kind": p.kind, "url": p.url, "pid": p.proc.pid if p.proc else None,
                  "log": str(p.log)} for p in self.parts]
        (self.logs / "fleet.json").write_text(json.dumps({"policy": self.topology.policy, "parts": parts}, indent=2)
                                              + "\n", encoding="utf-8")

    def _wait(self, kind: str, mine: list[Part], urls: list[str]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        waiting = dict.fromkeys(urls)
        kind_started = time.monotonic()
        while waiting and not self.stopping:
            for url in list(waiting):
                if answers(url):
                    del waiting[url]
            for part in mine:
                code = part.exited()
                if code is not None:
                    raise FleetError(f"{part.name} exited with status {code} before it was ready:\n{part.tail()}")
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise FleetError(f"{kind} not ready within {self.ready_timeout_s:.0f} s: {', '.join(waiting)}")
            time.sleep(0.5)
        if not self.stopping:
            self.say(f"{kind} ready in {time.monotonic() - kind_started:.0f} s")

    def watch(self) -> None:
        """Until stopped: report a part that exits (the others go on)."""
        while not self.stopping:
            for part in self.parts:
                code = part.exited()
                if code is not None and not part.reported:
                    part.reported = True
                    self.say(f"{part.name} exited with status {code}; the others go on:\n{part.tail(4)}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Every part, the last started first: SIGTERM, then SIGKILL for what is left."""
        import psutil

        for part in reversed(self.parts):
            if part.proc is None:
                continue
            try:
                tree = [psutil.Process(part.proc.pid), *psutil.Process(part.proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            part.stop(signal.SIGTERM if self.stopping < 2 else signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while part.exited() is None and time.monotonic() < deadline and self.stopping < 2:
                time.sleep(0.1)
            part.stop(signal.SIGKILL)
            with contextlib.suppress(Exception):
                part.proc.wait(timeout=5)
            for proc in tree:  # what it started in other process groups (an engine's vLLM server)
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(tree, timeout=5)


def fleet_command(args: argparse.Namespace, config: Config) -> int:
    """``voice-assistant fleet``: start the parts, print the URLs, run until stopped."""
    if args.topology:
        topology = Topology.from_file(Path(args.topology))
    else:
        port = args.port if args.port is not None else config.server.port
        topology = Topology.on_loopback(args.engines, args.servers, port, args.host or "127.0.0.1", args.policy)
    only = tuple(args.only or KINDS)
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="voice-fleet-"))
    logs.mkdir(parents=True, exist_ok=True)
    child_flags = [f for path in ([args.config] if args.config else []) for f in ("--config", path)]
    child_flags += [f for override in args.set for f in ("--set", override)]
    if "balancer" in only and is_local(topology.balancer.host):
        _check_free(topology.balancer)
    fleet = Fleet(topology, only=only, child_flags=child_flags, logs=logs, ready_timeout_s=args.ready_timeout)

    def on_signal(signum: int, frame: Any) -> None:
        fleet.stopping += 1
        if fleet.stopping == 2:
            fleet.say("second signal: killing every part")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        took = fleet.start()
        if fleet.stopping:
            return 0
        b = topology.balancer
        if any(p.kind == "balancer" for p in fleet.parts):
            fleet.say(f"{len(topology.engines)} engine(s) behind vllm-router ({topology.policy}) at "
                      f"{topology.router.url()}, {len(topology.servers)} voice server(s) behind HAProxy; logs in {logs}")
            print(f"fleet ready in {took:.0f} s: {b.url('ws', '/ws')}  (page {b.url('http', '/')})", flush=True)
        else:
            print(f"fleet parts ({', '.join(only)}) ready in {took:.0f} s; logs in {logs}", flush=True)
        fleet.watch()
        return 0
    finally:
        fleet.say("stopping the fleet...")
        fleet.stop()
        fleet.say("stopped")


def is_local(host: str) -> bool:
    """Whether ``host`` is this machine (loopback, a wildcard, or an address of one of its interfaces)."""
    import ipaddress

    import psutil

    if host in ("", "0.0.0.0", "::", "localhost", socket.gethostname()):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    mine = {a.address.split("%")[0] for nic in psutil.net_if_addrs().values() for a in nic}
    return any(ipaddress.ip_address(a.split("%")[0]).is_loopback or a.split("%")[0] in mine for a in addresses)


def _check_free(address: Address) -> None:
    """The balancer's port, tried before minutes of start-up."""
    with socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address.host or "0.0.0.0", address.port))
        except OSError as exc:
            raise FleetError(f"cannot listen on {address}: {exc.strerror or exc}") from None


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
