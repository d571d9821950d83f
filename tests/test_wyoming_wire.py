"""Wyoming's event reader with limits (:mod:`assistant.server.wyoming.wire`), without models or sockets."""

from __future__ import annotations

import asyncio
import json

import pytest

from assistant.server.wyoming.wire import WireError, WireLimits, read_event


def events(data: bytes, limits: WireLimits = WireLimits()) -> list[object]:
    """What the reader makes of ``data``: events, WireErrors (code, fatal), None at the end."""

    async def main() -> list[object]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        seen: list[object] = []
        while True:
            try:
                event = await read_event(reader, limits)
            except WireError as exc:
                seen.append((exc.code, exc.fatal))
                if exc.fatal:
                    return seen
                continue
            seen.append(event)
            if event is None:
                return seen

    return asyncio.run(main())


def header(**fields: object) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def test_an_event_with_data_and_payload_as_the_package_writes_it() -> None:
    data = json.dumps({"text": "hi"}).encode()
    got = events(header(type="synthesize", data={"voice": {"name": "x"}}, data_length=len(data), payload_length=3)
                 + data + b"abc")
    event = got[0]
    assert event.type == "synthesize" and event.data == {"voice": {"name": "x"}, "text": "hi"}  # type: ignore[attr-defined]
    assert event.payload == b"abc" and got[1] is None  # type: ignore[attr-defined]


@pytest.mark.parametrize("key", ["payload_length", "data_length"])
def test_a_length_over_the_limit_is_refused_before_reading(key: str) -> None:
    assert events(header(type="audio-chunk", **{key: 2 * 1024 ** 3}) + b"x" * 100) == [("too-large", True)]


@pytest.mark.parametrize("value", ["10", -1, 1.5, True, [1]])
def test_a_mistyped_length_ends_the_stream_it_cannot_follow(value: object) -> None:
    assert events(header(type="audio-chunk", payload_length=value)) == [("bad-event", True)]


@pytest.mark.parametrize("line", [b'{"type": 5}', b'["ping"]', b'{"type": "ping", "data": [1]}', b"garbage",
                                  b"[" * 1000 + b"]" * 1000, b'{"type": "ping"', b"\xff\xfe"])
def test_a_bad_header_is_an_error_and_the_next_event_is_read(line: bytes) -> None:
    got = events(line + b"\n" + header(type="ping"))
    assert got[0] == ("bad-event", False) and got[1].type == "ping" and got[2] is None  # type: ignore[union-attr]


def test_bad_data_after_a_sound_header_keeps_the_stream_in_step() -> None:
    got = events(header(type="ping", data_length=3) + b"[1]" + header(type="ping"))
    assert got[0] == ("bad-event", False) and got[1].type == "ping"  # type: ignore[union-attr]


def test_a_header_line_over_the_limit_and_a_stream_cut_inside_one() -> None:
    assert events(b'{"type": "' + b"x" * 20000 + b'"}\n', WireLimits(header_bytes=1024)) == [("too-large", True)]
    assert events(b'{"type": "pi') == [("bad-event", True)]
    assert events(b"") == [None]
