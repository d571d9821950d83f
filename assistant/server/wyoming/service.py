"""The Wyoming server and ``voice-assistant wyoming``: the ``wyoming`` package's TCP/Unix
server over :class:`~.handler.WyomingHandler`, and Home Assistant's discovery."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlparse

from wyoming.server import AsyncServer, AsyncTcpServer

from ...config import Config
from ...errors import InputError
from ...models import Models
from .handler import WyomingHandler, _Shared


@dataclass
class WyomingServer:
    """A started Wyoming server; ``stop()`` ends every connection."""

    uri: str
    server: AsyncServer
    handlers: set[WyomingHandler]

    @property
    def port(self) -> int | None:
        """The TCP port listened on (the real one when the URI asked for port 0)."""
        inner = getattr(self.server, "_server", None)
        if not isinstance(self.server, AsyncTcpServer) or inner is None or not inner.sockets:
            return None
        return int(inner.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        port = self.port
        if port is None:
            return self.uri
        return f"tcp://{self.server.host}:{port}"

    async def stop(self) -> None:
        for handler in list(self.handlers):
            handler.cancel()
        await self.server.stop()
        await asyncio.sleep(0)


def parse_uri(uri: str) -> AsyncServer:
    """The package's server for ``uri`` (tcp://HOST:PORT or unix://PATH), or an :class:`InputError`."""
    if urlparse(uri).scheme not in ("tcp", "unix"):
        raise InputError(f"--uri {uri}: expected tcp://HOST:PORT or unix://PATH (e.g. tcp://0.0.0.0:10300)")
    try:
        return AsyncServer.from_uri(uri)
    except ValueError as exc:
        raise InputError(f"--uri {uri}: {exc} (e.g. tcp://0.0.0.0:10300)") from None


async def wyoming_server(models: Models, config: Config, uri: str) -> WyomingServer:
    """Start a Wyoming server on ``uri`` over ``models`` in the running event
    loop, without blocking: the websocket server can run beside it."""
    server = parse_uri(uri)
    shared = _Shared.of(models, config)
    handlers: set[WyomingHandler] = set()
    try:
        await server.start(partial(WyomingHandler, shared, handlers))
    except OSError as exc:
        raise InputError(f"cannot listen on {uri}: {exc.strerror or exc}") from None
    return WyomingServer(uri=uri, server=server, handlers=handlers)


# --------------------------------------------------------------------------
# voice-assistant wyoming
# --------------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_listen(server: AsyncServer, uri: str) -> None:
    """Fail before the models load (most of a minute) when the port is taken."""
    if not isinstance(server, AsyncTcpServer) or server.port == 0:
        return
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((server.host, server.port))
    except OSError as exc:
        raise InputError(f"cannot listen on {uri}: {exc.strerror or exc}") from None
    finally:
        probe.close()


def zeroconf_check() -> None:
    """``--zeroconf`` needs the optional ``zeroconf`` package."""
    import importlib.util

    if importlib.util.find_spec("zeroconf") is None:
        raise InputError("--zeroconf needs the zeroconf package: pip install zeroconf")


async def announce(port: int, name: str | None) -> Callable[[], Any]:
    """Announce ``_wyoming._tcp.local.`` for Home Assistant's discovery; returns the undo."""
    from wyoming.zeroconf import HomeAssistantZeroconf

    try:
        zc = HomeAssistantZeroconf(port=port, name=name)
        await zc.register_server()
    except OSError as exc:
        raise InputError(f"--zeroconf: cannot announce the server ({exc.strerror or exc})") from None
    _say(f"announced as {zc.name}._wyoming._tcp.local. ({zc.host}:{port})")
    return zc._aiozc.async_close


def wyoming_command(args: Any, config: Config) -> int:
    """``voice-assistant wyoming``: load the models, serve Wyoming until SIGTERM/SIGINT."""
    import os

    from ...models import load_models

    if args.uri is None:
        args.uri = config.wyoming.uri
    server = parse_uri(args.uri)
    _check_listen(server, args.uri)
    if args.zeroconf is not None:
        if not isinstance(server, AsyncTcpServer):
            raise InputError("--zeroconf needs a tcp:// --uri")
        zeroconf_check()
    models = load_models(config)
    try:
        code = asyncio.run(_run(args, config, models))
    finally:
        models.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as `serve`: skip seconds of interpreter teardown of torch and vLLM


async def _run(args: Any, config: Config, models: Models) -> int:
    import signal

    started = time.monotonic()
    _say("warming up...")
    await models.warm_up()
    _say(f"warm in {time.monotonic() - started:.1f} s")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await wyoming_server(models, config, args.uri)
    close_zeroconf: Callable[[], Any] | None = None
    try:
        if args.zeroconf is not None and server.port is not None:
            close_zeroconf = await announce(server.port, args.zeroconf or None)
        print(f"wyoming on {server.url}", flush=True)
        await stop.wait()
    finally:
        _say(f"shutting down ({len(server.handlers)} connection(s) open)...")
        if close_zeroconf is not None:
            await close_zeroconf()
        await server.stop()
    _say("stopped")
    return 0
