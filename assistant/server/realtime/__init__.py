"""The OpenAI Realtime API (GA) on ``/v1/realtime``, for its SDKs and agents.

Split by job: :mod:`.codec` (the event names, the session config, every
client event parsed), :mod:`.state` (the items and responses of one
connection, every server event built from the session's events),
:mod:`.face` (what a request does to the session). :data:`ROUTE` is its row
in the listener's route table.
"""

from .face import REALTIME_PATH, ROUTE, RealtimeFace

__all__ = ["REALTIME_PATH", "ROUTE", "RealtimeFace"]
