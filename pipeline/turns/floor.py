"""Who holds the floor: the state behind "never talk over the user".

Only the turn controller writes it. Playback waits on :meth:`Floor.wait_until_clear`
(through the controller's gate) before a reply's first sample.
"""

from __future__ import annotations

import asyncio


class Floor:
    """Open user turns, ended user turns, and turns whose reply is playing."""

    def __init__(self, hold: bool = True) -> None:
        # hold=False (input faster than real time): a reply waits only for
        # the end of its own turn, never for other turns.
        self.hold = hold
        self.user_turns: set[int] = set()  # opened by the VAD, words not yet resolved
        self.assistant_turns: set[int] = set()  # reply audio handed to the output
        self.ended: set[int] = set()  # the user's speech of the turn has stopped
        self._changed = asyncio.Event()

    @property
    def assistant_speaking(self) -> bool:
        return bool(self.assistant_turns)

    def others_speaking(self, turn_id: int) -> bool:
        """Whether a user turn other than ``turn_id`` is open."""
        return any(t != turn_id for t in self.user_turns)

    def may_play(self, turn_id: int) -> bool:
        """A reply may start once its own turn ended and, with hold, nobody
        else has started speaking."""
        return turn_id in self.ended and not (self.hold and self.others_speaking(turn_id))

    async def wait_until_clear(self, turn_id: int) -> None:
        while not self.may_play(turn_id):
            self._changed.clear()
            await self._changed.wait()

    def changed(self) -> None:
        self._changed.set()
        if len(self.ended) > 256:
            self.ended = set(sorted(self.ended)[-128:])
