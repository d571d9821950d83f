"""The HTTP side of the one port: plain responses, the browser client's files, one request a connection.

Everything here answers before (or instead of) a websocket handshake: the
listener (:mod:`assistant.server.listener`) routes ``GET /``, ``/healthz``
and ``/metrics`` here, and :class:`HTTPConnection` keeps the websockets
library's parser to one request head per connection.
"""

from __future__ import annotations

import http
import logging
import mimetypes
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Response
from websockets.protocol import State

log = logging.getLogger("assistant.server")

WEB_DIR: Final = Path(__file__).resolve().parent / "web"
MAX_PATH_CHARS: Final = 2048  # a longer request target gets 414 (no file of the client is named that long)
MAX_HEAD_BYTES: Final = 65536  # past this without a blank line, the websockets parser's own limits answer
ALLOWED_METHODS: Final = ("GET", "HEAD")

CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
    ".wav": "audio/wav",
    ".txt": "text/plain; charset=utf-8",
}


def response(status: http.HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8") -> Response:
    headers = Headers(
        [
            ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def static_file(web_dir: Path, path: str) -> Response:
    """A file of the browser client; nothing outside its folder, ever."""
    relative = unquote(path)
    if relative in ("", "/"):
        relative = "/index.html"
    segments = relative.lstrip("/").split("/")
    bad = "\x00" in relative or "\\" in relative or any(s in ("", ".", "..") or s.startswith(".") for s in segments)
    try:  # a name too long for the file system is just not there (no OSError traceback)
        target = None if bad else (web_dir.joinpath(*segments)).resolve()
        found = target is not None and target.is_relative_to(web_dir) and target.is_file()
    except (OSError, ValueError):
        found = False
    if not found or target is None:
        if relative == "/index.html":
            return response(http.HTTPStatus.NOT_FOUND, b"the browser client is not installed (assistant/server/web)\n")
        return response(http.HTTPStatus.NOT_FOUND, b"not found\n")
    try:
        body = target.read_bytes()
    except OSError:
        return response(http.HTTPStatus.NOT_FOUND, b"not found\n")
    kind = CONTENT_TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return response(http.HTTPStatus.OK, body, kind)


def url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


class HTTPConnection(ServerConnection):
    """A websockets connection that hands its parser the request head alone.

    The websockets server reads the request head, then parses what follows
    as websocket frames even before it has answered: a second, pipelined
    request or a request body became a bogus frame, the parser ended the
    stream, and answering the first request then failed an assertion inside
    the library (a traceback per request). Here the head is cut at its blank
    line; anything after it before the answer (or a head announcing a body)
    gets a plain 400, and the connection closes. A request after the answer
    (a client that keeps the connection alive despite ``Connection: close``)
    closes the connection at once: writing the 400 after the answer's EOF
    raised inside the library, and the client waited for an answer forever.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head: bytearray | None = bytearray()  # None: the head is complete

    def data_received(self, data: bytes) -> None:
        if self.protocol.state is not State.CONNECTING:
            super().data_received(data)
            return
        if self._head is None:  # more bytes after the head, before the answer
            self._bad_request("one request per connection, without a body")
            return
        start = len(self._head)
        self._head += data
        end = self._head.find(b"\r\n\r\n", max(0, start - 3))
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self._head = None  # let the library refuse it with its own limits
            super().data_received(data)
            return
        head, extra = bytes(self._head[: end + 4]), len(self._head) > end + 4
        self._head = None
        if extra or _announces_body(head):
            self._bad_request("one request per connection, without a body")
            return
        super().data_received(data[: end + 4 - start])

    def _bad_request(self, why: str) -> None:
        if self.transport.is_closing():
            return
        if self.protocol.eof_sent:  # answered already, "Connection: close": a kept-alive client's next request
            log.info("HTTP request from %s: a second request on one connection; closing it", peer(self))
            self.transport.close()  # the client sees the close at once and opens a new connection
            return
        log.info("HTTP request from %s refused: %s", peer(self), why)
        refused = response(http.HTTPStatus.BAD_REQUEST, f"bad request: {why}\n".encode())
        refused.headers["Server"] = "voice-assistant"
        self.transport.write(refused.serialize())
        self.transport.close()


def _announces_body(head: bytes) -> bool:
    """A request head with a body to follow (Content-Length other than 0, or Transfer-Encoding)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False
