"""The conversation history: one exchange per turn, written by the controller alone.

An exchange opens when the turn's transcript is sent to the language model,
holds the reply as a draft once the model has written it (so the next
turn's prompt sees it, as a listener would by then), and is committed once:
when the reply has played, or cut to what the user heard when it was
interrupted. A reply thrown away before it was heard (the user went on
speaking) takes its exchange with it.

A turn that calls tools keeps its steps between the user's words and the
spoken reply, in the chat format every engine takes: the assistant's
``tool_calls``, then each call's ``tool`` result. A call left without a
result (the turn was cut off) gets one that says so when the exchange
is cut short, so the next turn's prompt is well formed and the model
knows; a call the client runs is answered later (:meth:`Conversation.result`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..tools import ToolCall

NO_RESULT = "(no result: the call was cancelled)"


@dataclass
class _Exchange:
    turn_id: int | None
    user: str
    reply: str | None = None
    interrupted: bool = False
    committed: bool = False
    steps: list[dict[str, Any]] = field(default_factory=list)  # tool calls and results, chat format

    def unanswered(self) -> list[str]:
        answered = {s["tool_call_id"] for s in self.steps if s["role"] == "tool"}
        return [c["id"] for s in self.steps for c in s.get("tool_calls", ()) if c["id"] not in answered]


class Conversation:
    """The dialogue so far, trimmed to ``budget`` tokens when a prompt is built.

    Only the last ``keep_exchanges`` settled exchanges are kept at all: far
    more than a prompt's budget holds, and a kiosk's conversation goes on for
    weeks.
    """

    keep_exchanges = 200

    def __init__(self, system_prompt: str, budget: int, count_tokens: Callable[[str], int]) -> None:
        self.system_prompt = system_prompt
        self.budget = budget
        self.count_tokens = count_tokens
        self._exchanges: list[_Exchange] = []

    # ---- written by the turn controller ----------------------------------

    def open(self, turn_id: int | None, user_text: str) -> None:
        """The user's words of a turn, about to be answered."""
        self._exchanges.append(_Exchange(turn_id, user_text))

    def draft(self, turn_id: int, reply: str) -> None:
        """The reply as the model wrote it (before it has been heard)."""
        exchange = self._find(turn_id)
        if exchange is not None and not exchange.committed:
            exchange.reply = reply or None

    def commit(self, turn_id: int, heard: str | None = None) -> None:
        """Settle the turn's reply, once.

        ``heard=None``: the draft stands (the reply played to its end).
        Otherwise the reply was cut short: only ``heard`` stays, marked
        interrupted; nothing heard leaves no reply (the user's words stay).
        """
        exchange = self._find(turn_id)
        if exchange is None or exchange.committed:
            return
        exchange.committed = True
        self._forget_old()
        if heard is not None:  # cut short: a call of this turn will get no result now
            for call_id in exchange.unanswered():
                exchange.steps.append({"role": "tool", "tool_call_id": call_id, "content": NO_RESULT})
            exchange.reply = heard.strip() or None
            exchange.interrupted = exchange.reply is not None

    def settle(self, turn_id: int, failed: bool = False) -> None:
        """The turn is over. A reply that ``failed`` (the engine was down: the
        error phrase was said instead) is no answer: the exchange goes, and the
        user will ask again. Otherwise the draft stands (:meth:`commit`)."""
        if failed:
            self.discard(turn_id)
        else:
            self.commit(turn_id)

    def discard(self, turn_id: int) -> None:
        """Forget the turn's exchange: its reply was thrown away unheard and
        the turn goes on (a new transcript will open it again)."""
        self._exchanges = [e for e in self._exchanges if e.turn_id != turn_id or e.committed]

    def add(self, turn_id: int, user: str = "", reply: str | None = None) -> None:
        """A message a client put into the conversation itself (a realtime
        client's text item, or its manually committed audio once transcribed):
        settled at once, since nobody has to hear it."""
        self._exchanges.append(_Exchange(turn_id, user, reply or None, committed=True))
        self._forget_old()

    def called(self, turn_id: int, calls: Sequence[ToolCall], text: str = "") -> None:
        """The model's reply for the turn called tools (after saying ``text``):
        a step of the open exchange, or of a new settled one (a client's own
        ``function_call`` item)."""
        step = {"role": "assistant", "content": text or None, "tool_calls": [c.openai() for c in calls]}
        exchange = self._find(turn_id)
        if exchange is None:
            self._exchanges.append(exchange := _Exchange(turn_id, "", committed=True))
            self._forget_old()
        exchange.steps.append(step)

    def result(self, call_id: str, output: str, turn_id: int | None = None) -> bool:
        """A call's result, in the exchange that made the call (settled or
        not: a client answers a call after the response is done). Without
        such a call it goes into a new settled exchange of ``turn_id``, or
        nowhere (False) when none is given."""
        for exchange in reversed(self._exchanges):
            if call_id in exchange.unanswered():
                exchange.steps.append({"role": "tool", "tool_call_id": call_id, "content": output})
                return True
        if turn_id is None:
            return False
        self._exchanges.append(_Exchange(turn_id, "", committed=True, steps=[
            {"role": "tool", "tool_call_id": call_id, "content": output}]))
        self._forget_old()
        return True

    def calls_of(self, turn_id: int) -> list[dict[str, Any]]:
        """The turn's tool steps so far (for reports and the faces)."""
        exchange = self._find(turn_id)
        return list(exchange.steps) if exchange is not None else []

    def _forget_old(self) -> None:
        while len(self._exchanges) > self.keep_exchanges and self._exchanges[0].committed:
            del self._exchanges[0]

    def truncate(self, turn_id: int, heard: str) -> bool:
        """A settled reply of which the client says only ``heard`` was played:
        cut to it, never lengthened (a barge-in may have cut it shorter already)."""
        exchange = self._find(turn_id)
        if exchange is None or not exchange.committed or exchange.reply is None:
            return False
        if len(heard.split()) >= len(exchange.reply.split()):
            return False
        exchange.reply = heard.strip() or None
        exchange.interrupted = exchange.reply is not None
        return True

    def remove(self, turn_id: int, role: str) -> bool:
        """Forget one side of a turn's exchange (a realtime client deleted that item)."""
        exchange = self._find(turn_id)
        if exchange is None:
            return False
        if role == "user":
            exchange.user = ""
        elif role == "tool":
            exchange.steps.clear()
        else:
            exchange.reply, exchange.interrupted = None, False
        return True

    def said(self, turn_id: int, role: str) -> str | None:
        """What one side of a turn's exchange holds now (None: nothing)."""
        kept = [t["content"] for t in self.turns
                if t["turn_id"] == turn_id and t["role"] == role and "tool_calls" not in t]
        return kept[-1] if kept else None

    def is_open(self, turn_id: int) -> bool:
        exchange = self._find(turn_id)
        return exchange is not None and not exchange.committed

    def _find(self, turn_id: int) -> _Exchange | None:
        for exchange in reversed(self._exchanges):
            if exchange.turn_id == turn_id:
                return exchange
        return None

    # ---- read by the language model stage and the reports ----------------

    @property
    def turns(self) -> list[dict[str, Any]]:
        """Every message so far, oldest first, with its turn id."""
        out: list[dict[str, Any]] = []
        for e in self._exchanges:
            if e.user:  # a reply asked for without words (realtime response.create) has none
                out.append({"role": "user", "content": e.user, "turn_id": e.turn_id})
            out.extend({**step, "turn_id": e.turn_id} for step in e.steps)
            if e.reply is not None:
                out.append({"role": "assistant", "content": e.reply, "interrupted": e.interrupted, "turn_id": e.turn_id})
        return out

    def messages(self, upto: int | None = None) -> list[dict[str, str]]:
        """System prompt plus the most recent messages that fit the budget.

        ``upto``: the prompt for that turn's reply (later turns left out).
        Whole messages are dropped from the oldest end, never cut, and the
        prompt never starts with an assistant message.
        """
        turns = self.turns
        if upto is not None:
            turns = [t for t in turns if t["turn_id"] is None or t["turn_id"] <= upto]
        kept: list[dict[str, Any]] = []
        used = 0
        for turn in reversed(turns):
            content = turn["content"]
            if turn.get("interrupted"):
                # Cut off mid-speech: a trailing dash says so in the text
                # itself (a bracketed note was copied into replies by the
                # small model), and only the heard words are there.
                content = f"{content.rstrip(' ,;:-—')} —"
            message: dict[str, Any] = {"role": turn["role"], "content": content}
            for key in ("tool_calls", "tool_call_id"):
                if key in turn:
                    message[key] = turn[key]
            cost = self.count_tokens(content or "") + 4 + sum(
                self.count_tokens(c["function"]["arguments"]) + 4 for c in turn.get("tool_calls", ()))
            if kept and used + cost > self.budget:
                break
            kept.append(message)
            used += cost
        kept.reverse()
        while kept and kept[0]["role"] in ("assistant", "tool"):  # never a reply or a result without its question
            kept.pop(0)
        return [{"role": "system", "content": self.system_prompt}, *kept]
