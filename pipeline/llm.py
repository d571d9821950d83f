"""The language model stage: a reply request in, a stream of tokens out.

The engine is vLLM: in-process (``AsyncLLM``) or a vLLM server over HTTP,
shared by every session of the process either way (its scheduler batches
concurrent sessions). This module knows nothing about which, or how it was
built (see ``assistant/engine/``); it only needs :class:`LanguageModel`'s
calls. Cancelling the turn cancels the task iterating the stream; the
stream is always closed (which aborts the request in an in-process engine
and, by closing the HTTP response, in a server), and ``abort`` is called as
well so that no request is ever left running.

An engine that fails (a server down or refusing, a crashed engine) raises
:class:`EngineUnavailable` or anything else: the stage then reports a
:class:`StageError` (the client's ``error`` event) and writes the configured
error reply in place of the answer, which is spoken like any reply: after
the user has finished, and stoppable by barge-in. The session goes on; the
turn controller keeps that exchange out of the history.

A reply that falls into a loop (a small model writing "1,000,000,000,..."
until ``max_tokens``: seen once in 220 turns of a soak, where its 96 tokens
of digits outlasted the turn's 20 s cap) is stopped where the loop shows
(:func:`runaway`), with ``finish_reason`` "repetition": what was written is
spoken, the request is aborted.

Every reply, a session's and the Wyoming conversation agent's, goes through
one loop, :class:`ReplyStream`: the runaway guard, the abort, the error
phrase, and the function calls the model makes (:mod:`pipeline.tools`):
the engine yields a call's pieces as :class:`CallPiece`, the stream joins
them into :class:`~pipeline.tools.ToolCall` s, and a reply that ends in
calls ends this step of the turn with :class:`~pipeline.frames.ToolCalled`
(the turn controller decides what follows) instead of ``LLMDone``.

The prompt comes from the session's conversation history
(:class:`pipeline.turns.Conversation`), which only the turn controller
writes; the stage reads it when it starts on a request, so a reply written
just before is part of it.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from .frames import LLMDone, LLMToken, ReplyRequest, StageError, ToolCallDelta, ToolCalled
from .runtime import PipelineContext, Stage
from .tools import NO_TOOLS, ToolCall, ToolChoice, ToolSpec, new_call_id, offered

log = logging.getLogger("pipeline.llm")


RUNAWAY_WINDOW = 48  # characters
RUNAWAY_UNIT = 12  # the longest repeated unit looked for, characters


def runaway(text: str) -> bool:
    """Whether the reply's last RUNAWAY_WINDOW characters are one short unit
    repeated (",000" x 12, "ha " x 16): a loop, not language."""
    tail = text[-RUNAWAY_WINDOW:]
    if len(tail) < RUNAWAY_WINDOW:
        return False
    for period in range(1, RUNAWAY_UNIT + 1):
        unit = tail[-period:]
        if (unit * (RUNAWAY_WINDOW // period + 1)).endswith(tail):
            return True
    return False


class EngineUnavailable(RuntimeError):
    """The engine cannot answer now (unreachable, refusing, stopped); the
    message is a sentence that says why (logged on one line, no traceback)."""


@dataclass(frozen=True, slots=True)
class CallPiece:
    """A piece of a function call as an engine streams it: the call at
    ``index`` (its id and name come with its first piece), and more of its
    JSON arguments."""

    index: int
    arguments: str
    call_id: str | None = None
    name: str | None = None


class ForcedCall:
    """A call the request requires, from the text an engine writes under
    :func:`pipeline.tools.call_schema`: a named tool's arguments stream as
    pieces; ``required``'s ``{"name", "arguments"}`` becomes one piece once whole."""

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self.call_id = new_call_id()
        self.written = ""

    def piece(self, text: str) -> CallPiece | None:
        first = not self.written
        self.written += text
        if self.choice.mode != "named" or not text:
            return None
        return CallPiece(0, text, self.call_id if first else None, self.choice.name if first else None)

    def end(self, request_id: str) -> CallPiece | None:
        if self.choice.mode != "required":
            return None
        try:
            call = json.loads(self.written)
            return CallPiece(0, json.dumps(call["arguments"]), self.call_id, str(call["name"]))
        except (ValueError, KeyError, TypeError):
            log.warning("%s: the forced call is not whole: %.120s", request_id, self.written)
            return None


Message = dict[str, Any]  # OpenAI chat format: role, content, tool_calls, tool_call_id


class LanguageModel(Protocol):
    """What the stage needs from an engine."""

    def stream(
        self,
        messages: list[Message],
        request_id: str,
        session_id: str = "",
        tools: Sequence[ToolSpec] = (),
        tool_choice: ToolChoice = NO_TOOLS,
    ) -> AsyncIterator[tuple[str, str | None] | CallPiece]:
        """Yield ``(text_delta, finish_reason_or_None)`` pairs, and the
        :class:`CallPiece` s of any call the model makes to ``tools`` (a
        forced ``tool_choice`` must yield one). ``session_id`` lets a router
        keep a session on the replica that caches its prefix."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def count_tokens(self, text: str) -> int: ...


class ReplyStream:
    """One reply streamed from the engine: the loop every reply goes through.

    Use it as ``async with ReplyStream(...) as reply: async for delta in reply``.
    It yields the reply's text deltas. A reply that falls into a loop
    (:func:`runaway`) ends there with ``finish_reason`` "repetition". An
    engine that fails ends it with ``failure`` (a sentence), ``on_failure``
    called with it, and ``error_reply`` yielded as the last delta. Leaving
    the block always closes the engine's stream and, unless the reply
    finished, aborts its request: a consumer cancelled or gone mid-reply
    leaves nothing running.
    """

    def __init__(
        self,
        model: LanguageModel,
        messages: list[Message],
        request_id: str,
        session_id: str = "",
        error_reply: str = "",
        on_failure: Callable[[str], None] | None = None,
        tools: Sequence[ToolSpec] = (),
        tool_choice: ToolChoice = NO_TOOLS,
        on_call: Callable[[str, str, str], None] | None = None,
    ) -> None:
        """``on_call(call_id, name, arguments_delta)``: each piece of a call's arguments."""
        self.model = model
        self.request_id = request_id
        self.error_reply = error_reply
        self.on_failure = on_failure
        self.on_call = on_call
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.failure: str | None = None
        self._calls: dict[int, list[str]] = {}  # index -> [call id, name, arguments]
        self._finished = False
        self._stream = (model.stream(messages, request_id, session_id, tools, tool_choice) if tools
                        else model.stream(messages, request_id, session_id))
        self._deltas_gen: Any = None

    @property
    def text(self) -> str:
        return "".join(self.parts).strip()

    @property
    def calls(self) -> tuple[ToolCall, ...]:
        """The calls the model made, in order (none once the engine failed)."""
        if self.failure is not None:
            return ()
        return tuple(ToolCall(c[0], c[1], c[2]) for _, c in sorted(self._calls.items()) if c[1])

    def _call_piece(self, piece: CallPiece) -> None:
        call = self._calls.get(piece.index)
        if call is None:
            call = self._calls[piece.index] = [piece.call_id or new_call_id(), piece.name or "", ""]
        elif piece.name and not call[1]:
            call[1] = piece.name
        call[2] += piece.arguments
        if self.on_call is not None and call[1]:
            self.on_call(call[0], call[1], piece.arguments)

    async def __aenter__(self) -> ReplyStream:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._deltas_gen is not None:
            await self._deltas_gen.aclose()
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()  # at once, not whenever the generator is collected
        if not self._finished:  # cancelled, stopped or failed: no request left running
            await self.model.abort(self.request_id)

    def __aiter__(self) -> AsyncIterator[str]:
        self._deltas_gen = self._deltas()
        return self._deltas_gen

    async def _deltas(self) -> AsyncIterator[str]:
        written = ""
        try:
            async for item in self._stream:
                if isinstance(item, CallPiece):
                    self._call_piece(item)
                    continue
                delta, reason = item
                if delta:
                    self.parts.append(delta)
                    yield delta
                    written = (written + delta)[-RUNAWAY_WINDOW:]
                    if runaway(written):
                        self.finish_reason = "repetition"
                        log.warning("%s: the reply fell into a loop after %d tokens; stopped",
                                    self.request_id, len(self.parts))
                        return  # not finished: the request is aborted on exit
                if reason is not None:
                    self.finish_reason = reason
        except EngineUnavailable as exc:
            failure = str(exc)
            log.warning("%s: %s", self.request_id, failure)
        except Exception as exc:  # the engine broke mid-reply: whoever asked goes on
            failure = f"the language model failed: {type(exc).__name__}: {exc}"
            log.error("%s: %s", self.request_id, failure, exc_info=exc)
        else:
            self._finished = True
            return
        self.failure, self.finish_reason = failure, "error"
        if self.on_failure is not None:
            self.on_failure(failure)
        if self.error_reply:
            phrase = (" " if self.parts else "") + self.error_reply
            self.parts.append(phrase)
            yield phrase


class PromptSource(Protocol):
    """Where the stage reads a turn's prompt (the turn controller's history)."""

    def messages(self, upto: int | None = None) -> list[Message]: ...


class LLMStage(Stage):
    """Streams the reply to each final transcript, token by token."""

    name = "llm"
    scope = "reply"
    _ids = itertools.count(1)

    def __init__(
        self,
        ctx: PipelineContext,
        model: LanguageModel,
        history: PromptSource,
        session_id: str,
        error_reply: str = "",
    ) -> None:
        super().__init__(ctx)
        self.model = model
        self.history = history
        self.session_id = session_id
        self.error_reply = error_reply
        # The turn controller's: a turn's calls are out, its answer is still to be asked for here.
        self.steps_pending: Callable[[], bool] = lambda: False

    def holds_end(self) -> bool:
        return self.steps_pending()

    async def handle(self, item: Any) -> None:
        if not isinstance(item, ReplyRequest):
            await self.send(item)
            return
        turn_id = item.turn_id

        def failed(why: str) -> None:
            self.publish(StageError(turn_id=turn_id, stage=self.name, message=why))

        if item.say is not None:  # said as it is: no model asked
            if item.say:
                await self.send(LLMToken(turn_id=turn_id, text=item.say, index=0))
            await self.send(LLMDone(turn_id=turn_id, text=item.say, tokens=0, finish_reason="stop"))
            return

        def call_delta(call_id: str, name: str, delta: str) -> None:
            self.publish(ToolCallDelta(turn_id=turn_id, call_id=call_id, name=name, delta=delta))

        choice = item.tool_choice or NO_TOOLS
        tools = offered(item.tools, choice)
        request_id = f"{self.session_id}-t{turn_id}-{next(self._ids)}"
        messages = self.history.messages(upto=turn_id)
        async with ReplyStream(self.model, messages, request_id, self.session_id, self.error_reply, failed,
                               tools, choice if tools else NO_TOOLS, call_delta) as reply:
            async for delta in reply:
                await self.send(LLMToken(turn_id=turn_id, text=delta, index=len(reply.parts) - 1))
        if reply.calls:  # this step ends in calls: the controller decides what follows
            self.publish(ToolCalled(turn_id=turn_id, calls=reply.calls, text=reply.text))
            return
        await self.send(LLMDone(turn_id=turn_id, text=reply.text, tokens=len(reply.parts),
                                finish_reason=reply.finish_reason))
