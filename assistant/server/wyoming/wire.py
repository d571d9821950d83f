"""Reading Wyoming's events with limits: the header line, its data and payload bounded before they are read.

The ``wyoming`` package's reader trusts a header's ``data_length`` and
``payload_length`` (a claim of 2 GB followed by 136 MB of bytes kept those
136 MB), and its JSON is decoded without a depth check. Here every header
goes through the guard the other faces share
(:func:`~assistant.server.face.load_client_json`), each length is checked
against a limit before a byte of it is read, and a header of the wrong
shape is an :class:`WireError` the handler answers with an ``error`` event.
A header whose lengths are sound is read to its end, so the stream stays in
step and the connection goes on; one that claims too much cannot be skipped
without reading it, so that connection ends (after its ``error``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

from wyoming.event import Event

from ..face import load_client_json

MAX_HEADER_BYTES: Final = 16 * 1024  # a header line: type, version, lengths and small data
MAX_DATA_BYTES: Final = 64 * 1024  # the JSON data after a header (a synthesize's text, a transcript)
MAX_PAYLOAD_BYTES: Final = 1024 * 1024  # an audio-chunk's PCM: Home Assistant sends 2 KB, 1 MB is ~10 s of 48 kHz stereo


class WireError(Exception):
    """A header or its data that the protocol does not allow. ``fatal``: the
    stream cannot be followed past it (the connection ends after the ``error``)."""

    def __init__(self, code: str, text: str, fatal: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.fatal = fatal


@dataclass(frozen=True)
class WireLimits:
    header_bytes: int = MAX_HEADER_BYTES
    data_bytes: int = MAX_DATA_BYTES
    payload_bytes: int = MAX_PAYLOAD_BYTES


def _length(header: dict, key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise WireError("bad-event", f"{key} {value!r}: expected a byte count", fatal=True)
    if value > limit:
        raise WireError("too-large", f"{key} {value} is over the limit of {limit} bytes", fatal=True)
    return value


async def read_event(reader: asyncio.StreamReader, limits: WireLimits = WireLimits()) -> Event | None:
    """The next event, ``None`` at the end of the stream, or a :class:`WireError`."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise WireError("bad-event", "the stream ended inside a header", fatal=True) from None
    except asyncio.LimitOverrunError:
        raise WireError("too-large", f"a header line over {limits.header_bytes} bytes", fatal=True) from None
    if len(line) > limits.header_bytes:
        raise WireError("too-large", f"a header line of {len(line)} bytes is over the limit of "
                        f"{limits.header_bytes}", fatal=True)
    try:
        header = load_client_json(line, limits.header_bytes, "header")
    except ValueError as exc:
        raise WireError("bad-event", str(exc)) from None  # the line is consumed: the stream is still in step
    if not isinstance(header, dict):
        raise WireError("bad-event", "a header must be a JSON object")
    data_length = _length(header, "data_length", limits.data_bytes)
    payload_length = _length(header, "payload_length", limits.payload_bytes)
    data_bytes = await reader.readexactly(data_length) if data_length else b""
    payload = await reader.readexactly(payload_length) if payload_length else None
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise WireError("bad-event", "a header needs a type (a string)")
    data = header.get("data", {})
    if not isinstance(data, dict):
        raise WireError("bad-event", f"{kind!r}: data must be a JSON object")
    if data_bytes:
        try:
            more = load_client_json(data_bytes, limits.data_bytes, "data")
        except ValueError as exc:
            raise WireError("bad-event", f"{kind!r}: {exc}") from None
        if not isinstance(more, dict):
            raise WireError("bad-event", f"{kind!r}: data must be a JSON object")
        data = {**data, **more}
    return Event(type=kind, data=data, payload=payload)
