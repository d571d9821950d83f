"""Whether this voice server can take one more session within its budgets.

A fixed ``server.max_sessions`` says nothing about a server whose cores are
already saturated: its third session is admitted and every session's
answers slow down. So admission reads the server's own measurements:

* the voice-to-voice time of its recent turns (the last
  ``server.load_window_s``), against ``budgets.voice_to_voice_ms``: while
  their p95 is above ``server.load_threshold`` of the budget, one more
  session would push the others over it;
* the event loop's lag (a tick every :data:`TICK_S`, as LiveKit's workers
  refresh their load): a loop that is late is a server that is behind on
  every session's audio;
* the session count against ``server.max_sessions``.

The load is the largest of those ratios; the server accepts while it is
below 1. With no session open there is nothing to be slow for, so a server
with no sessions always accepts (its window is history). ``/readyz``
answers 200 while it accepts and 503 otherwise, for a load balancer's
health check; a session that arrives anyway gets the protocol's
"too many sessions" at once (:meth:`Listener`).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Final

from pipeline.frames import now
from pipeline.metrics import percentile

TICK_S: Final = 0.5  # how often the loop's lag is sampled
LAG_LIMIT_MS: Final = 250.0  # a loop this late is behind on every session's audio (a frame is 20 ms)
MIN_TURNS: Final = 3  # fewer recent turns than this say nothing about the load


@dataclass(frozen=True)
class Load:
    """One reading, for ``/healthz``, ``/readyz`` and ``/metrics``."""

    accepting: bool
    load: float  # the largest of the ratios below; accepting while < 1
    reason: str | None  # why not, when not accepting
    sessions: int
    recent_turns: int
    p95_ms: float | None  # recent voice-to-voice p95 (None: too few turns)
    lag_ms: float

    def json(self) -> dict[str, object]:
        return {
            "accepting": self.accepting,
            "load": round(self.load, 3),
            "reason": self.reason,
            "recent_turns": self.recent_turns,
            "voice_to_voice_p95_ms": None if self.p95_ms is None else round(self.p95_ms),
            "loop_lag_ms": round(self.lag_ms, 1),
        }


class Capacity:
    """The server's recent turns and loop lag, read as "room for one more session"."""

    def __init__(self, max_sessions: int, budget_ms: float, threshold: float, window_s: float) -> None:
        self.max_sessions = max_sessions
        self.budget_ms = budget_ms
        self.threshold = threshold
        self.window_s = window_s
        self._turns: collections.deque[tuple[float, float]] = collections.deque()  # (at, voice to voice ms)
        self._lags: collections.deque[tuple[float, float]] = collections.deque()  # (at, lag ms)

    def turn(self, voice_to_voice_ms: float, at: float | None = None) -> None:
        self._turns.append((now() if at is None else at, voice_to_voice_ms))

    def lag(self, ms: float, at: float | None = None) -> None:
        self._lags.append((now() if at is None else at, ms))

    def read(self, sessions: int, at: float | None = None) -> Load:
        at = now() if at is None else at
        for series, keep in ((self._turns, self.window_s), (self._lags, 5 * TICK_S)):
            while series and series[0][0] < at - keep:
                series.popleft()
        recent = [ms for _, ms in self._turns]
        p95 = percentile(recent, 95) if len(recent) >= MIN_TURNS else None
        lag = max((ms for _, ms in self._lags), default=0.0)
        ratios = {"sessions": sessions / self.max_sessions if self.max_sessions > 0 else 1.0}
        if sessions > 0:  # with no session open, the window is history
            if p95 is not None and self.budget_ms > 0:
                ratios["latency"] = p95 / (self.threshold * self.budget_ms)
            ratios["loop_lag"] = lag / LAG_LIMIT_MS
        worst = max(ratios, key=lambda k: ratios[k])
        load = ratios[worst]
        reason = None
        if load >= 1 and worst == "sessions":
            reason = f"at its limit of {self.max_sessions} sessions"
        elif load >= 1 and worst == "latency":
            reason = (f"busy: recent voice-to-voice p95 {p95:.0f} ms is over {self.threshold:.0%} "
                      f"of its {self.budget_ms:.0f} ms budget")
        elif load >= 1:
            reason = f"busy: its event loop is {lag:.0f} ms late"
        return Load(load < 1, load, reason, sessions, len(recent), p95, lag)

    async def watch_loop(self) -> None:
        """Sample the loop's lag every :data:`TICK_S` until cancelled."""
        while True:
            start = now()
            await asyncio.sleep(TICK_S)
            self.lag(max(0.0, (now() - start - TICK_S) * 1000.0))
