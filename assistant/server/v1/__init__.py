"""The project's own websocket protocol, version 1, on ``/ws`` (docs/protocol.md).

:mod:`.codec` is every message (names, parsing, building); :mod:`.face`
what the client's messages do to its session. :data:`ROUTE` is its row in
the listener's route table.
"""

from .face import ROUTE, WS_PATH, V1Face

__all__ = ["ROUTE", "WS_PATH", "V1Face"]
