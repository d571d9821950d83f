"""``voice-assistant serve``: load the models once, listen, serve until SIGTERM/SIGINT.

The process around the listener (:mod:`.listener`): bind before minutes
of model loading (a busy port fails at once), warm up, serve, and on the
first signal shut down gracefully (in-flight turns get
``server.shutdown_grace_s``), on a second hurry it (turns cancelled,
sessions still told). Whatever happens, the vLLM engine's processes end
with this one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from ..config import Config
from ..errors import UserError
from .listener import Server

log = logging.getLogger("assistant.server")


class ListenError(UserError):
    """The server cannot listen on the requested address."""

    exit_code = 4


def _listen(host: str, port: int) -> socket.socket:
    """Bind first, before minutes of model loading, so a busy port fails at once."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def serve(args: argparse.Namespace, config: Config) -> int:
    """``voice-assistant serve``: load the models, serve until SIGTERM/SIGINT.

    The first signal shuts down gracefully; a second one hurries it (turns
    cancelled, sessions still told). Whatever happens, the vLLM engine's
    processes end with this one: a signal outside the event loop (model
    loading, engine shutdown) stops them and exits at once.
    """
    from ..models import load_models, stop_child_processes

    host = args.host if args.host is not None else config.server.host
    port = args.port if args.port is not None else config.server.port
    sock = _listen(host, port)
    _exit_on_signal()
    try:
        models = load_models(config)
    except BaseException:
        sock.close()
        stop_child_processes()
        raise
    try:
        code = asyncio.run(_serve(args, config, models, host, sock))
    finally:
        _exit_on_signal()  # asyncio.run put back the default handlers
        started = time.monotonic()
        models.close()
        stopped = stop_child_processes()
        log.info("engine stopped in %.1f s%s", time.monotonic() - started,
                 f" ({stopped} process(es) left over were stopped)" if stopped else "")
    # Sessions are closed and the engine is stopped: nothing is left to
    # save. Interpreter teardown of torch, CTranslate2 and vLLM's modules
    # took another 3.4 s, which a supervisor waiting on SIGTERM would see
    # as a hung process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_on_signal() -> None:
    """Outside the event loop, SIGTERM/SIGINT stop the engine's processes and exit now (128 + signal)."""
    from ..models import stop_child_processes

    def handler(signum: int, _frame: Any) -> None:
        print(f"signal {signum}: stopping the engine and exiting", file=sys.stderr, flush=True)
        stop_child_processes(timeout=1.0)
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


async def _serve(args: argparse.Namespace, config: Config, models: Any, host: str, sock: socket.socket) -> int:
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    say("warming up...")
    await models.warm_up()
    say(f"warm in {time.monotonic() - started:.1f} s")
    engine = models.llm.health()
    if engine["state"] != "up":
        say(f"note: the language model server at {engine['url']} does not answer ({engine['error']}); "
            "turns get an apology until it does (retrying in the background)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    server = Server(models, config, host=host, token=args.token, sock=sock)

    def on_signal() -> None:
        if stop.is_set():  # the second one: no more grace, but the sessions are still told
            if not server.hurried.is_set():
                say("second signal: cancelling in-flight turns...")
            server.hurry()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):  # kept until the loop ends: a second signal must not kill
        loop.add_signal_handler(sig, on_signal)
    await server.start()
    if not (server.web_dir / "index.html").is_file():
        say(f"note: no browser client in {server.web_dir}; the websocket endpoint works without it")
    print(f"serving on {server.url}  (websocket {server.ws_url})", flush=True)
    if server.token is not None:
        say("auth: clients need the token (Authorization: Bearer TOKEN, or ?token=TOKEN)")
    if host in ("", "0.0.0.0", "::"):
        say(f"listening on all interfaces, port {server.port}")
    await stop.wait()
    say(f"shutting down ({server.sessions} session(s) open)...")
    await server.shutdown()
    say("stopped")
    return 0
