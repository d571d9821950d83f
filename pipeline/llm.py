"""The language model stage: a reply request in, a stream of tokens out.

The engine is vLLM's in-process ``AsyncLLM`` (shared by every session of the
process; its scheduler batches concurrent sessions). This module knows
nothing about how the engine was built (see ``assistant/models.py``); it
only needs :class:`LanguageModel`'s two calls. Cancelling the turn cancels
the task iterating the stream, which closes vLLM's generator and aborts the
request in the engine; ``abort`` is called as well so that no request is
ever left running.

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

from .frames import LLMDone, LLMToken, ReplyRequest
from .runtime import PipelineContext, Stage

log = logging.getLogger("pipeline.llm")


class LanguageModel(Protocol):
    """What the stage needs from an engine."""

    def stream(self, messages: list[dict[str, str]], request_id: str) -> AsyncIterator[tuple[str, str | None]]:
        """Yield ``(text_delta, finish_reason_or_None)`` pairs."""
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

    def __init__(self, ctx: PipelineContext, model: LanguageModel, history: PromptSource, session_id: str) -> None:
        super().__init__(ctx)
        self.model = model
        self.history = history
        self.session_id = session_id

    async def handle(self, item: Any) -> None:
        if not isinstance(item, ReplyRequest):
            await self.send(item)
            return
        turn_id = item.turn_id
        request_id = f"{self.session_id}-t{turn_id}-{next(self._ids)}"
        parts: list[str] = []
        finish: str | None = None
        finished = False
        index = 0
        try:
            async for delta, reason in self.model.stream(self.history.messages(upto=turn_id), request_id):
                if delta:
                    parts.append(delta)
                    await self.send(LLMToken(turn_id=turn_id, text=delta, index=index))
                    index += 1
                if reason is not None:
                    finish = reason
            finished = True
        finally:
            if not finished:  # cancelled: make sure no request is left running
                await self.model.abort(request_id)
        reply = "".join(parts).strip()
        await self.send(LLMDone(turn_id=turn_id, text=reply, tokens=index, finish_reason=finish))


class VLLMModel:
    """:class:`LanguageModel` over a vLLM ``AsyncLLM`` engine and its tokenizer."""

    def __init__(self, engine: Any, tokenizer: Any, max_tokens: int, temperature: float, top_p: float) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.engine = engine
        self.tokenizer = tokenizer
        self.params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            output_kind=RequestOutputKind.DELTA,
        )

    def prompt(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    async def stream(self, messages: list[dict[str, str]], request_id: str) -> AsyncIterator[tuple[str, str | None]]:
        async for output in self.engine.generate(self.prompt(messages), self.params, request_id):
            completion = output.outputs[0]
            yield completion.text, completion.finish_reason if output.finished else None

    async def abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:  # already finished or engine shutting down
            log.debug("abort of %s failed", request_id, exc_info=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def pending_requests(self) -> int:
        return int(self.engine.get_num_unfinished_requests())
