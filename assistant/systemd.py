"""systemd's notify protocol: READY, STATUS, WATCHDOG and STOPPING.

Under a ``Type=notify`` unit systemd passes ``$NOTIFY_SOCKET``, a datagram
socket (a path, or an abstract name written with a leading ``@``); each
datagram is newline-separated ``KEY=VALUE`` lines. With ``WatchdogSec=``
it also passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``): the service must
send ``WATCHDOG=1`` more often than that or be restarted. The protocol is
these few lines, so no package is needed; outside systemd every call is a
no-op.

The pings come from a task on the event loop (:func:`keep_alive`), and only
while ``alive()`` says the rest of the process is well (the audio callback
delivering frames): a hung loop or a dead audio stream stops them, and
systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger("assistant.systemd")


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET`` (or nowhere)."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address = address or None
        self._socket: socket.socket | None = None
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop on a full queue (a unix datagram
            # socket holds ~10 messages): a ping that cannot go now is dropped.
            self._socket.setblocking(False)
        self.sent: list[str] = []  # the last few messages, for logs and tests

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, message: str) -> bool:
        """One datagram; False (logged once per failure) if it could not be sent."""
        if self._socket is None or self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._socket.sendto(message.encode("utf-8"), target)
        except BlockingIOError:
            log.debug("sd_notify queue full: %r dropped", message)
            return False
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        self.sent = [*self.sent[-15:], message]
        return True

    def ready(self, status: str) -> bool:
        return self.send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(f"STOPPING=1\nSTATUS={_one_line(status)}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between pings (half systemd's ``WatchdogSec``), or None when
    the watchdog is off or meant for another process."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 1e6 / 2)
    except ValueError:
        return None


async def keep_alive(notifier: Notifier, interval: float, alive: Callable[[], bool]) -> None:
    """Ping every ``interval`` seconds while ``alive()``; run as a task."""
    was_alive = True
    while True:
        await asyncio.sleep(interval)
        ok = alive()
        if ok:
            notifier.watchdog()
        elif was_alive:
            log.error("not alive (audio stream or pipeline stalled): withholding the watchdog ping")
        was_alive = ok


def _one_line(text: str) -> str:
    return " ".join(text.split())
