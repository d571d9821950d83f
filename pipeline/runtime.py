"""The asyncio machinery every stage shares: channels, turns, cancellation.

Stages never talk to each other directly. Each stage is a task that reads
from one bounded :class:`Channel` and writes to the next, and publishes the
events it produces on the :class:`EventBus`, which hands each one first to
the turn controller (:mod:`pipeline.turns`, where every decision about turns
is taken) and then to observers (reports, the websocket bridge, logs). The
plumbing of turns lives here:

* :class:`TurnRegistry` hands out turn ids and knows which are cancelled.
* :meth:`Turn.cancel` is the one place a turn is cancelled: it cancels the
  work each stage is doing for that turn (which aborts the vLLM request and
  stops synthesis), drops the turn's frames still queued in every channel,
  and tells the output to stop playing it.
* Blocking model calls run in executors through :func:`run_blocking` and
  :func:`iterate_blocking`, so the event loop keeps serving audio.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from .frames import (
    END,
    BudgetExceeded,
    EndOfStream,
    Event,
    ReplyCancelled,
    SpeechResumed,
    StageError,
    TurnCancelled,
    TurnCompleted,
    now,
)
from .metrics import BUDGETED_SPANS, REPLY_MILESTONES, Span, milestones_of


log = logging.getLogger("pipeline")

T = TypeVar("T")


# --------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------


class EventBus:
    """Every event, first to the turn controller, then to the observers.

    The controller (:meth:`route_to`) is the one party that *decides* on
    events (see :mod:`pipeline.turns`); observers (reports, the websocket
    bridge, logs, the budget watchdog) only watch, and must be quick and not
    block. An event published while another is being handed out (a
    decision's own events: an interruption, a cancelled turn) waits until
    that one has reached everybody, so observers always see events in cause
    order.
    """

    def __init__(self) -> None:
        self._subscribers: list[Callable[[Event], None]] = []
        self._controller: Callable[[Event], None] | None = None
        self._pending: deque[Event] = deque()
        self._dispatching = False

    def route_to(self, controller: Callable[[Event], None]) -> None:
        """Hand every event to ``controller`` before any observer."""
        if self._controller is not None:
            raise RuntimeError("the bus already has a turn controller")
        self._controller = controller

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def publish(self, event: Event) -> None:
        self._pending.append(event)
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._pending:
                self._dispatch(self._pending.popleft())
        finally:
            self._dispatching = False

    def _dispatch(self, event: Event) -> None:
        if self._controller is not None:
            try:
                self._controller(event)
            except Exception:  # a failed decision must not take the session down
                log.exception("turn controller failed on %s", type(event).__name__)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # an observer must never break the pipeline
                log.exception("event observer failed on %s", type(event).__name__)


# --------------------------------------------------------------------------
# Turns
# --------------------------------------------------------------------------


@dataclass(eq=False)
class Turn:
    """One user utterance and the reply to it: the unit of cancellation."""

    id: int
    started_at: float = field(default_factory=now)
    cancelled: bool = False
    cancel_reason: str | None = None
    _on_cancel: list[Callable[[], Any]] = field(default_factory=list)
    _on_reply_cancel: list[Callable[[], Any]] = field(default_factory=list)

    def on_cancel(self, callback: Callable[[], Any]) -> Callable[[], None]:
        """Run ``callback`` if the turn is cancelled; returns an unregister."""
        if self.cancelled:
            callback()
            return lambda: None
        self._on_cancel.append(callback)

        def unregister() -> None:
            try:
                self._on_cancel.remove(callback)
            except ValueError:
                pass

        return unregister

    def on_reply_cancel(self, callback: Callable[[], Any]) -> Callable[[], None]:
        """Run ``callback`` if the turn's reply is thrown away (or the turn is)."""
        unregister_turn = self.on_cancel(callback)
        if self.cancelled:
            return unregister_turn
        self._on_reply_cancel.append(callback)

        def unregister() -> None:
            unregister_turn()
            try:
                self._on_reply_cancel.remove(callback)
            except ValueError:
                pass

        return unregister


class TurnRegistry:
    """Hands out turn ids, remembers which turns are cancelled."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._turns: dict[int, Turn] = {}
        self._next = 1
        self._channels: list[Channel[Any]] = []
        self._reply_channels: list[Channel[Any]] = []

    def new(self) -> Turn:
        turn = Turn(self._next)
        self._next += 1
        self._turns[turn.id] = turn
        # Keep memory bounded for sessions that run for weeks.
        if len(self._turns) > 256:
            for old in sorted(self._turns)[:-128]:
                del self._turns[old]
        return turn

    def get(self, turn_id: int) -> Turn | None:
        return self._turns.get(turn_id)

    def is_cancelled(self, turn_id: int | None) -> bool:
        if turn_id is None:
            return False
        turn = self._turns.get(turn_id)
        return turn is not None and turn.cancelled

    def attach(self, channel: Channel[Any], reply: bool = False) -> None:
        self._channels.append(channel)
        if reply:
            self._reply_channels.append(channel)

    def cancel_reply(self, turn_id: int, reason: str) -> bool:
        """Throw away the reply being prepared, keep the user's turn open.

        Used when the reply was started early (at a pause) and the user went
        on speaking: the reply stages' work for the turn is cancelled and
        their queued items dropped; listening and recognition go on.
        """
        turn = self._turns.get(turn_id)
        if turn is None or turn.cancelled:
            return False
        callbacks, turn._on_reply_cancel = turn._on_reply_cancel, []
        for callback in callbacks:
            try:
                turn._on_cancel.remove(callback)
            except ValueError:
                pass
            try:
                callback()
            except Exception:
                log.exception("reply cancel callback failed for turn %d", turn_id)
        for channel in self._reply_channels:
            channel.drop_turn(turn_id)
        self._bus.publish(ReplyCancelled(turn_id=turn_id, reason=reason))
        return True

    def cancel(self, turn_id: int, reason: str) -> bool:
        """Cancel a turn as a whole. Returns False if it was already over."""
        turn = self._turns.get(turn_id)
        if turn is None or turn.cancelled:
            return False
        turn.cancelled = True
        turn.cancel_reason = reason
        callbacks, turn._on_cancel = turn._on_cancel, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("cancel callback failed for turn %d", turn_id)
        dropped = sum(channel.drop_turn(turn_id) for channel in self._channels)
        log.debug("turn %d cancelled (%s), %d queued frames dropped", turn_id, reason, dropped)
        self._bus.publish(TurnCancelled(turn_id=turn_id, reason=reason))
        return True


# --------------------------------------------------------------------------
# Channels
# --------------------------------------------------------------------------


class Channel(Generic[T]):
    """A bounded FIFO between two stages that can drop a cancelled turn's items.

    ``put`` waits while the channel is full (back-pressure); ``put_nowait``
    never waits and drops the oldest item instead, for real-time sources such
    as a microphone callback that must not block.
    """

    def __init__(self, name: str, maxsize: int = 64) -> None:
        self.name = name
        self.maxsize = maxsize
        self.overflows = 0
        self._items: deque[T] = deque()
        self._data = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: T) -> None:
        while len(self._items) >= self.maxsize:
            self._space.clear()
            await self._space.wait()
        self._items.append(item)
        self._data.set()

    def put_nowait(self, item: T) -> None:
        if len(self._items) >= self.maxsize:
            self._items.popleft()
            self.overflows += 1
        self._items.append(item)
        self._data.set()

    async def get(self) -> T:
        while not self._items:
            self._data.clear()
            await self._data.wait()
        item = self._items.popleft()
        self._space.set()
        return item

    def drop_turn(self, turn_id: int) -> int:
        """Remove every queued item that belongs to ``turn_id``."""
        before = len(self._items)
        self._items = deque(i for i in self._items if getattr(i, "turn_id", None) != turn_id)
        self._space.set()
        return before - len(self._items)


# --------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------


@dataclass
class PipelineContext:
    """What every stage of one session shares."""

    bus: EventBus
    turns: TurnRegistry

    def cancel_turn(self, turn_id: int, reason: str) -> bool:
        return self.turns.cancel(turn_id, reason)


END_HOLD_S = 60.0
"""The longest a stage holds the end of input for work still to come back (a hung tool)."""


class Stage(ABC):
    """A pipeline stage: a task that turns input items into output items.

    Subclasses implement :meth:`handle`. Work for a turn runs as its own task
    registered with that turn, so cancelling the turn interrupts it wherever
    it is (awaiting a token, a synthesis, a queue) without stopping the stage.
    An exception in :meth:`handle` becomes a :class:`StageError` event and the
    stage goes on with the next item: one bad turn never ends a session.
    """

    name: ClassVar[str] = "stage"
    # "reply" stages work on the assistant's answer: their work for a turn is
    # also cancelled when only the reply is thrown away (see cancel_reply).
    scope: ClassVar[str] = "turn"

    def __init__(self, ctx: PipelineContext) -> None:
        self.ctx = ctx
        self.inbox: Channel[Any] = Channel(f"{self.name}.in")
        self.outbox: Channel[Any] | None = None

    @abstractmethod
    async def handle(self, item: Any) -> None:
        """Process one item; call :meth:`send` / :meth:`publish` for results."""

    async def finish(self) -> None:
        """The input ended: flush whatever is pending. Default: nothing."""

    async def send(self, item: Any) -> None:
        """Pass an item downstream; events are also published on the bus."""
        if isinstance(item, Event):
            self.ctx.bus.publish(item)
        if self.outbox is not None:
            await self.outbox.put(item)

    def publish(self, event: Event) -> None:
        self.ctx.bus.publish(event)

    def holds_end(self) -> bool:
        """Whether the end of input must wait: work still to come back to this
        stage (a reply's answer after its function calls). Default: never."""
        return False

    async def run(self) -> None:
        held_since: float | None = None
        while True:
            item = await self.inbox.get()
            if isinstance(item, EndOfStream) and self.holds_end():
                held_since = now() if held_since is None else held_since
                if now() - held_since < END_HOLD_S:
                    await asyncio.sleep(0.02)
                    self.inbox.put_nowait(item)  # behind what comes back meanwhile
                    continue
            if isinstance(item, EndOfStream):
                await self.finish()
                if self.outbox is not None:
                    await self.outbox.put(item)
                return
            turn_id = getattr(item, "turn_id", None)
            if self.ctx.turns.is_cancelled(turn_id):
                continue
            await self._handle_for_turn(item, turn_id)

    async def _handle_for_turn(self, item: Any, turn_id: int | None) -> None:
        turn = self.ctx.turns.get(turn_id) if turn_id is not None else None
        task = asyncio.create_task(self.handle(item), name=f"{self.name}:{turn_id}")
        if turn is None:
            unregister: Callable[[], None] = lambda: None  # noqa: E731
        elif self.scope == "reply":
            unregister = turn.on_reply_cancel(task.cancel)
        else:
            unregister = turn.on_cancel(task.cancel)
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:  # the stage itself is being stopped
            task.cancel()
            raise
        finally:
            unregister()
        if task.cancelled():
            return  # the turn was cancelled: its work is simply gone
        exc = task.exception()
        if exc is not None:
            log.error("%s failed on turn %s: %s", self.name, turn_id, exc, exc_info=exc)
            self.publish(StageError(turn_id=turn_id, stage=self.name, message=str(exc) or type(exc).__name__))
            if turn_id is not None:
                self.ctx.cancel_turn(turn_id, f"{self.name} failed")


def connect(ctx: PipelineContext, stages: list[Stage]) -> None:
    """Chain stages in order: each one's outbox is the next one's inbox."""
    for upstream, downstream in zip(stages, stages[1:]):
        upstream.outbox = downstream.inbox
    for stage in stages:
        ctx.turns.attach(stage.inbox, reply=stage.scope == "reply")


async def run_stages(stages: list[Stage]) -> None:
    """Run every stage until END has flowed through all of them."""
    async with asyncio.TaskGroup() as group:
        for stage in stages:
            group.create_task(stage.run(), name=f"stage:{stage.name}")


async def end_of_input(first: Stage) -> None:
    await first.inbox.put(END)


# --------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------

# The budgeted spans, the milestones they run between and which of those
# belong to the reply are in pipeline/metrics.py, with the report's.
BUDGETED: dict[str, Span] = {span.name: span for span in BUDGETED_SPANS}
_BUDGET_MILESTONES = frozenset(name for span in BUDGETED_SPANS for name in (span.start, span.end))


@dataclass(frozen=True)
class Budget:
    """How long a stage may take, and what to do the moment it has not."""

    stage: str
    ms: float
    policy: str = "log"


class Watchdog:
    """Enforces per-stage budgets while a turn runs.

    When a stage's starting milestone is reached a timer is armed for its
    deadline (``loop.call_at`` on the monotonic clock every stamp uses);
    reaching the ending milestone disarms it. If the timer fires, the stage
    is late *now*: a :class:`BudgetExceeded` event is published (the turn
    controller applies the configured policy as it hears it) and the
    stage's counter goes up.
    """

    def __init__(self, bus: EventBus, budgets: list[Budget]) -> None:
        unknown = [b.stage for b in budgets if b.stage not in BUDGETED]
        if unknown:
            raise ValueError(f"no such budgeted stage: {', '.join(unknown)}")
        self._bus = bus
        self._budgets = {b.stage: b for b in budgets}
        self._stamps: dict[int, dict[str, float]] = {}
        self._timers: dict[tuple[int, str], asyncio.TimerHandle] = {}
        self.results: dict[int, dict[str, dict[str, Any]]] = {}
        self.exceeded: dict[str, int] = {stage: 0 for stage in BUDGETED}
        bus.subscribe(self.observe)

    def observe(self, event: Event) -> None:
        turn_id = event.turn_id
        if turn_id is None or isinstance(event, BudgetExceeded):
            return
        if isinstance(event, SpeechResumed):
            # The pause was not the end: forget it and what it armed.
            stamps = self._stamps.get(turn_id, {})
            stamps.pop("speech_end", None)
            for span in BUDGETED_SPANS:
                if span.start == "speech_end":
                    self._disarm(turn_id, span.name)
            return
        if isinstance(event, ReplyCancelled):
            stamps = self._stamps.get(turn_id, {})
            for name in REPLY_MILESTONES:
                stamps.pop(name, None)
            for span in BUDGETED_SPANS:
                if span.start in REPLY_MILESTONES:
                    self._disarm(turn_id, span.name)
            return
        for name, stamp in milestones_of(event):
            if name in _BUDGET_MILESTONES:
                self._reach(turn_id, name, stamp)
        if isinstance(event, (TurnCompleted, TurnCancelled)):
            for stage in BUDGETED:
                self._disarm(turn_id, stage)
            self._stamps.pop(turn_id, None)

    def _reach(self, turn_id: int, name: str, stamp: float) -> None:
        stamps = self._stamps.setdefault(turn_id, {})
        if name in stamps and name != "speech_end":
            return  # only the first token, the first chunk... count
        stamps[name] = stamp
        for span in BUDGETED_SPANS:
            if span.end == name and span.start in stamps:
                self._disarm(turn_id, span.name)
                self._record(turn_id, span.name, (stamp - stamps[span.start]) * 1000)
            elif span.start == name and span.end not in stamps and span.name in self._budgets:
                self._arm(turn_id, span.name, stamp + self._budgets[span.name].ms / 1000)

    def _arm(self, turn_id: int, stage: str, deadline: float) -> None:
        self._disarm(turn_id, stage)
        loop = asyncio.get_running_loop()
        self._timers[(turn_id, stage)] = loop.call_at(deadline, self._fire, turn_id, stage)

    def _disarm(self, turn_id: int, stage: str) -> None:
        timer = self._timers.pop((turn_id, stage), None)
        if timer is not None:
            timer.cancel()

    def _record(self, turn_id: int, stage: str, elapsed_ms: float) -> None:
        budget = self._budgets.get(stage)
        entry = self.results.setdefault(turn_id, {}).setdefault(stage, {})
        entry["elapsed_ms"] = round(elapsed_ms, 1)
        if budget is not None:
            entry["budget_ms"] = budget.ms
            entry.setdefault("exceeded", elapsed_ms > budget.ms)

    def _fire(self, turn_id: int, stage: str) -> None:
        self._timers.pop((turn_id, stage), None)
        budget = self._budgets[stage]
        start = self._stamps.get(turn_id, {}).get(BUDGETED[stage].start)
        if start is None:
            return
        elapsed_ms = (now() - start) * 1000
        self.exceeded[stage] += 1
        entry = self.results.setdefault(turn_id, {}).setdefault(stage, {})
        entry.update(budget_ms=budget.ms, exceeded=True, fired_after_ms=round(elapsed_ms, 1), policy=budget.policy)
        event = BudgetExceeded(
            turn_id=turn_id, stage=stage, budget_ms=budget.ms, elapsed_ms=round(elapsed_ms, 1), policy=budget.policy
        )
        log.info("turn %d: %s over budget (%.0f ms > %.0f ms), policy %s", turn_id, stage, elapsed_ms, budget.ms, budget.policy)
        self._bus.publish(event)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


# --------------------------------------------------------------------------
# Blocking work
# --------------------------------------------------------------------------


RECENT_TIMINGS = 10_000
"""Per-call timings a stage keeps for the benchmark (recent ones: a kiosk's
session lives for weeks)."""


class DeadlineExecutor(Executor):
    """One worker thread for a model every session shares; the job due
    soonest runs first, FIFO among equals.

    With four sessions on one Whisper (or one piper), first come first served
    let a session's partial decode, wanted in a second, hold up another's
    final decode, wanted now. A job's deadline is a monotonic time (the
    frames' clock, :func:`now`); a plain :meth:`submit` is due at once. A job
    already running is never preempted: the gain is in what runs next.
    """

    def __init__(self, name: str) -> None:
        self._queue: list[tuple[float, int, Future[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self.reordered = 0  # jobs that overtook one submitted before them
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if kwargs:
            return self.submit_by(now(), lambda: fn(*args, **kwargs))
        return self.submit_by(now(), fn, *args)

    def submit_by(self, deadline: float, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)``, wanted by ``deadline``."""
        future: Future[T] = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            if self._queue and deadline < max(entry[0] for entry in self._queue):
                self.reordered += 1
            heapq.heappush(self._queue, (deadline, next(self._order), future, fn, args))
            self._wake.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                _, _, future, fn, args = heapq.heappop(self._queue)
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while waiting (a cancelled turn)
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting task, as ThreadPoolExecutor does
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._wake:
            self._closed = True
            if cancel_futures:
                for entry in self._queue:
                    entry[2].cancel()
                self._queue.clear()
            self._wake.notify_all()
        if wait:
            self._thread.join()


def _submit(executor: Executor | None, deadline: float | None, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
    if deadline is not None and isinstance(executor, DeadlineExecutor):
        return asyncio.wrap_future(executor.submit_by(deadline, fn, *args))
    return asyncio.get_running_loop().run_in_executor(executor, fn, *args)


async def run_blocking(
    executor: Executor | None, fn: Callable[..., T], *args: Any, deadline: float | None = None
) -> T:
    """Run a blocking model call off the event loop (by ``deadline``, where
    the executor orders its jobs: :class:`DeadlineExecutor`)."""
    return await _submit(executor, deadline, fn, *args)


async def iterate_blocking(
    executor: Executor | None, make: Callable[[], Iterator[T]], deadline: float | None = None
) -> AsyncIterator[T]:
    """Iterate a blocking generator in an executor, one item at a time
    (each by ``deadline``, as :func:`run_blocking`).

    Stops pulling as soon as the consumer stops (a cancelled turn), so at
    most one more item is computed after cancellation.
    """
    loop = asyncio.get_running_loop()
    sentinel = object()
    iterator: Iterator[T] | None = None

    def start() -> Iterator[T]:
        return iter(make())

    def step(it: Iterator[T]) -> Any:
        return next(it, sentinel)

    iterator = await _submit(executor, deadline, start)
    try:
        while True:
            item = await _submit(executor, deadline, step, iterator)
            if item is sentinel:
                return
            yield item  # type: ignore[misc]
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            loop.run_in_executor(executor, close)


class Once:
    """A thread-safe lazy value: models load once per process."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._value: Any = None
        self._done = False

    def get(self) -> Any:
        with self._lock:
            if not self._done:
                self._value = self._factory()
                self._done = True
            return self._value
