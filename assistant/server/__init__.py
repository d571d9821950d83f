"""The network faces: every wire a client speaks, over one connection class and one session API.

:mod:`.listener` is the port and its route table (a websocket path -> a
face); :mod:`.connection` the I/O of one websocket; :mod:`.face` what a
face implements and may use. The faces: :mod:`.v1` (``/ws``, the project's
protocol and the browser page's), :mod:`.realtime` (``/v1/realtime``, the
OpenAI Realtime API), :mod:`.wyoming` (Home Assistant, its own TCP server).
"""
