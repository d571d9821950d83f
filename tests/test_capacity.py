"""Load-aware admission (assistant/server/capacity.py): room for one more session, from the server's own figures."""

from __future__ import annotations

from assistant.server.capacity import LAG_LIMIT_MS, MIN_TURNS, Capacity


def capacity(max_sessions: int = 8) -> Capacity:
    return Capacity(max_sessions, budget_ms=1000.0, threshold=0.8, window_s=30.0)


def test_an_idle_server_accepts_whatever_its_history() -> None:
    c = capacity()
    for i in range(10):
        c.turn(5000.0, at=float(i))
    c.lag(2000.0, at=9.0)
    load = c.read(sessions=0, at=10.0)
    assert load.accepting and load.reason is None


def test_slow_recent_turns_refuse_a_new_session_until_they_age_out() -> None:
    c = capacity()
    for i in range(MIN_TURNS):
        c.turn(900.0, at=float(i))  # over 80 % of the 1000 ms budget
    load = c.read(sessions=2, at=3.0)
    assert not load.accepting and load.load > 1
    assert load.reason is not None and "p95" in load.reason and "1000 ms budget" in load.reason
    assert c.read(sessions=2, at=40.0).accepting  # 30 s later the window is empty


def test_fast_turns_and_too_few_turns_leave_room() -> None:
    c = capacity()
    for i in range(20):
        c.turn(500.0, at=float(i))
    load = c.read(sessions=3, at=20.0)
    assert load.accepting and load.p95_ms == 500.0 and 0 < load.load < 1
    few = capacity()
    for i in range(MIN_TURNS - 1):
        few.turn(9000.0, at=float(i))
    assert few.read(sessions=1, at=5.0).accepting  # one slow turn is not a load


def test_the_session_count_and_the_loop_lag_bound_it() -> None:
    c = capacity(max_sessions=2)
    assert c.read(sessions=1, at=0.0).accepting
    full = c.read(sessions=2, at=0.0)
    assert not full.accepting and full.reason == "at its limit of 2 sessions"
    c.lag(LAG_LIMIT_MS * 2, at=1.0)
    late = c.read(sessions=1, at=1.5)
    assert not late.accepting and late.reason is not None and "late" in late.reason
    assert c.read(sessions=1, at=10.0).accepting  # the lag is read over the last few ticks only
