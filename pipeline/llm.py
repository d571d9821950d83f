"""The language model stage: a final transcript in, a stream of tokens out.

The engine is vLLM's in-process ``AsyncLLM`` (shared by every session of the
process; its scheduler batches concurrent sessions). This module knows
nothing about how the engine was built (see ``assistant/models.py``); it
only needs :class:`LanguageModel`'s two calls. Cancelling the turn cancels
the task iterating the stream, which closes vLLM's generator and aborts the
request in the engine; ``abort`` is called as well so that no request is
ever left running.

:class:`Conversation` is per-session state: the history kept within a token
budget, oldest exchanges dropped first, the system prompt always kept.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .frames import LLMDone, LLMToken, TranscriptFinal
from .runtime import PipelineContext, Stage

log = logging.getLogger("pipeline.llm")


class LanguageModel(Protocol):
    """What the stage needs from an engine."""

    def stream(self, messages: list[dict[str, str]], request_id: str) -> AsyncIterator[tuple[str, str | None]]:
        """Yield ``(text_delta, finish_reason_or_None)`` pairs."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def count_tokens(self, text: str) -> int: ...


@dataclass
class Conversation:
    """The dialogue so far, trimmed to ``budget`` tokens when a prompt is built."""

    system_prompt: str
    budget: int
    count_tokens: Callable[[str], int]
    turns: list[dict[str, Any]] = field(default_factory=list)
    # Replies cut by a barge-in: turn id -> the text the user heard. It wins
    # over whatever the LLM stage records for that turn, before or after.
    heard: dict[int, str] = field(default_factory=dict)

    def add_user(self, text: str, turn_id: int | None = None) -> None:
        self.turns.append({"role": "user", "content": text, "turn_id": turn_id})

    def add_assistant(self, text: str, interrupted: bool = False, turn_id: int | None = None) -> None:
        if turn_id is not None and turn_id in self.heard:
            return  # already cut at what was heard
        self.turns.append({"role": "assistant", "content": text, "interrupted": interrupted, "turn_id": turn_id})

    def record_heard(self, turn_id: int, heard: str) -> None:
        """Keep only what the user heard of a turn's reply, marked interrupted.

        Nothing heard: the reply leaves no trace (the user's words stay).
        """
        self.heard[turn_id] = heard
        if len(self.heard) > 256:
            for old in sorted(self.heard)[:-128]:
                del self.heard[old]
        for i, turn in enumerate(self.turns):
            if turn["role"] == "assistant" and turn.get("turn_id") == turn_id:
                if heard:
                    self.turns[i] = {**turn, "content": heard, "interrupted": True}
                else:
                    del self.turns[i]
                return
        if heard:
            self.turns.append({"role": "assistant", "content": heard, "interrupted": True, "turn_id": turn_id})

    def messages(self) -> list[dict[str, str]]:
        """System prompt plus the most recent turns that fit the budget.

        Whole turns are dropped from the oldest end, never cut mid-message,
        and the prompt never starts with an assistant message.
        """
        kept: list[dict[str, str]] = []
        used = 0
        for turn in reversed(self.turns):
            content = turn["content"]
            if turn.get("interrupted"):
                # Cut off mid-speech: a trailing dash says so in the text
                # itself (a bracketed note was copied into replies by the
                # small model), and only the heard words are there.
                content = f"{content.rstrip(' ,;:-—')} —"
            cost = self.count_tokens(content) + 4
            if kept and used + cost > self.budget:
                break
            kept.append({"role": turn["role"], "content": content})
            used += cost
        kept.reverse()
        while kept and kept[0]["role"] == "assistant":
            kept.pop(0)
        return [{"role": "system", "content": self.system_prompt}, *kept]


class LLMStage(Stage):
    """Streams the reply to each final transcript, token by token."""

    name = "llm"
    scope = "reply"
    _ids = itertools.count(1)

    def __init__(self, ctx: PipelineContext, model: LanguageModel, conversation: Conversation, session_id: str) -> None:
        super().__init__(ctx)
        self.model = model
        self.conversation = conversation
        self.session_id = session_id

    async def handle(self, item: Any) -> None:
        if not isinstance(item, TranscriptFinal):
            await self.send(item)
            return
        turn_id = item.turn_id
        mark = len(self.conversation.turns)
        self.conversation.add_user(item.text, turn_id)
        request_id = f"{self.session_id}-t{turn_id}-{next(self._ids)}"
        parts: list[str] = []
        finish: str | None = None
        finished = False
        index = 0
        try:
            async for delta, reason in self.model.stream(self.conversation.messages(), request_id):
                if delta:
                    parts.append(delta)
                    await self.send(LLMToken(turn_id=turn_id, text=delta, index=index))
                    index += 1
                if reason is not None:
                    finish = reason
            finished = True
        finally:
            if not finished:
                await self.model.abort(request_id)
                turn = self.ctx.turns.get(turn_id) if turn_id is not None else None
                if turn is not None and not turn.cancelled:
                    # Only the reply was thrown away (it started early and the
                    # user went on): forget the exchange, a new one will come.
                    del self.conversation.turns[mark:]
                else:
                    heard = "".join(parts).strip()
                    if heard:
                        self.conversation.add_assistant(heard, interrupted=True, turn_id=turn_id)
        reply = "".join(parts).strip()
        self.conversation.add_assistant(reply, turn_id=turn_id)
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
