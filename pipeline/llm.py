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

The prompt comes from the session's conversation history
(:class:`pipeline.turns.Conversation`), which only the turn controller
writes; the stage reads it when it starts on a request, so a reply written
just before is part of it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from .frames import LLMDone, LLMToken, ReplyRequest, StageError
from .runtime import PipelineContext, Stage

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


class LanguageModel(Protocol):
    """What the stage needs from an engine."""

    def stream(
        self, messages: list[dict[str, str]], request_id: str, session_id: str = ""
    ) -> AsyncIterator[tuple[str, str | None]]:
        """Yield ``(text_delta, finish_reason_or_None)`` pairs. ``session_id``
        lets a router keep a session on the replica that caches its prefix."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def count_tokens(self, text: str) -> int: ...


class PromptSource(Protocol):
    """Where the stage reads a turn's prompt (the turn controller's history)."""

    def messages(self, upto: int | None = None) -> list[dict[str, str]]: ...


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

    async def handle(self, item: Any) -> None:
        if not isinstance(item, ReplyRequest):
            await self.send(item)
            return
        turn_id = item.turn_id
        request_id = f"{self.session_id}-t{turn_id}-{next(self._ids)}"
        parts: list[str] = []
        finish: str | None = None
        finished = False
        failure: str | None = None
        index = 0
        stream = self.model.stream(self.history.messages(upto=turn_id), request_id, self.session_id)
        written = ""
        try:
            async for delta, reason in stream:
                if delta:
                    parts.append(delta)
                    await self.send(LLMToken(turn_id=turn_id, text=delta, index=index))
                    index += 1
                    written = (written + delta)[-RUNAWAY_WINDOW:]
                    if runaway(written):
                        finish = "repetition"
                        log.warning("turn %d: the reply fell into a loop after %d tokens; stopped", turn_id, index)
                        break  # not finished: the request is aborted below
                if reason is not None:
                    finish = reason
            else:
                finished = True
        except EngineUnavailable as exc:
            failure = str(exc)
            log.warning("turn %d: %s", turn_id, failure)
        except Exception as exc:  # the engine broke mid-turn: the session goes on
            failure = f"the language model failed: {type(exc).__name__}: {exc}"
            log.error("turn %d: %s", turn_id, failure, exc_info=exc)
        finally:
            await stream.aclose()  # at once, not whenever the generator is collected
            if not finished:  # cancelled or failed: make sure no request is left running
                await self.model.abort(request_id)
        if failure is not None:
            self.publish(StageError(turn_id=turn_id, stage=self.name, message=failure))
            if self.error_reply:
                text = (" " if parts else "") + self.error_reply
                parts.append(text)
                await self.send(LLMToken(turn_id=turn_id, text=text, index=index))
                index += 1
            finish = "error"
        reply = "".join(parts).strip()
        await self.send(LLMDone(turn_id=turn_id, text=reply, tokens=index, finish_reason=finish))
