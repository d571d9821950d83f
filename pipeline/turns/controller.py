"""The turn controller: the one place where turns are decided.

Stages report what they detect and produce as events; the event bus hands
every event to the controller *before* any observer sees it, and the
controller answers with explicit commands to the stages:

==========================  ==================================================
it hears                    it decides / commands
==========================  ==================================================
speech started              the user holds the floor; over a playing reply:
                            barge-in (stop playback, keep what was heard in
                            the history, cancel the turn)
transcript at a pause       endpointing: ``vad.require_silence``; an early
                            reply (``llm`` gets a :class:`ReplyRequest`)
end of turn scored          (the semantic model, where enabled) endpointing
                            again, with its opinion beside the words
speech resumed              the early reply is thrown away
transcript final            hold/supersede older replies; the reply request
                            (or the early one is confirmed / replaced)
no words                    the turn is dropped
speech stopped, floor free  playback may start the reply (:meth:`wait_to_play`)
reply audio started/ended   the VAD's barge-in mode (``vad.set_assistant_speaking``)
budget exceeded             the policy: ``asr.force_final``, an acknowledgement
                            or an apology (``playback.interject``), a cancel
reply written as an error   (the engine was down: the LLM stage wrote the
                            error phrase) played like any reply, kept out of
                            the history
reply played / cancelled    the single commit of the reply to the history
buffer transcribed          (a client that ends its turns itself committed it)
                            its words into the history; a reply asked for
                            meanwhile (:meth:`respond`) starts now
the reply called tools      the calls into the history; a tool this process
                            runs goes to the tool stage (not before the turn
                            is the user's for sure: a call made at a pause
                            waits for the final transcript); a client's tool
                            ends the reply (the client sends the result)
a tool's result             into the history; when every call is back, the
                            model answers from the results (or, when one
                            failed, the tool apology is said)
==========================  ==================================================

A client that drives the turns itself (the realtime face's manual turns,
text items) does so through the session, whose verbs land here:
:meth:`transcribe`, :meth:`respond`, :meth:`stop_reply`, :meth:`add_message`,
:meth:`truncate`, :meth:`remove_message`, :meth:`set_instructions`,
:meth:`set_tools`, :meth:`add_call`, :meth:`add_result`.

Everything here runs synchronously in the event loop (no awaits): a
decision is taken the moment its event is produced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..asr import agreed_prefix, has_words
from ..frames import (
    BudgetExceeded,
    BufferTranscribed,
    Event,
    LLMDone,
    LLMToken,
    ReplyAudioEnded,
    ReplyAudioStarted,
    ReplyInterrupted,
    ReplyRequest,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    TranscriptEmpty,
    TranscriptFinal,
    TranscriptPartial,
    TurnCancelled,
    TurnCompleted,
    ToolCalled,
    ToolRequest,
    ToolResult,
    TranscribeRequest,
    TurnEndScored,
    now,
)
from ..runtime import PipelineContext
from ..tools import NO_TOOLS, ToolCall, ToolChoice, ToolSpec, preselect
from .endpointing import EndpointRule
from .floor import Floor
from .history import Conversation

if TYPE_CHECKING:
    from ..asr import ASRStage
    from ..llm import LLMStage
    from ..playback import PlaybackStage
    from ..tools import ToolStage
    from ..vad import VADStage

log = logging.getLogger("pipeline.turns")


@dataclass(frozen=True)
class TurnSettings:
    """The turn rules' knobs (from the config's vad, asr, barge_in and budgets keys)."""

    endpoint: EndpointRule = field(default_factory=EndpointRule)
    # Start the reply at a pause, during the silence hangover (asr.final_at_pause).
    early_reply: bool = True
    # Real-time input: hold replies while the user speaks, let the VAD listen
    # for barge-in, act on budgets. Input fed faster than real time has a
    # compressed clock: every turn is answered in order, budgets only reported.
    realtime: bool = True
    barge_in: bool = True
    # How long a pause may run while its words are still being read (see
    # TurnController._await_the_words); None: the VAD's own hangover.
    await_words_ms: int | None = 780
    acknowledgement: str = "One moment."
    apology: str = "Sorry, that took too long."
    # Function calls (config: tools): how the model chooses, whether a
    # question with one tool's keywords forces that tool, how many rounds
    # of calls one turn may make, and what is said when a call fails.
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    preselect: bool = True
    max_tool_rounds: int = 1
    tool_apology: str = "Sorry, I couldn't get that information right now."


@dataclass
class Stages:
    """The stages the controller gives commands to (any may be absent in a test rig)."""

    vad: VADStage | None = None
    asr: ASRStage | None = None
    llm: LLMStage | None = None
    playback: PlaybackStage | None = None
    tools: ToolStage | None = None


@dataclass
class _Calls:
    """A turn's function calls: the request's tools, the rounds made, the calls still out."""

    tools: tuple[ToolSpec, ...]
    choice: ToolChoice
    rounds: int = 0
    pending: set[str] = field(default_factory=set)  # local calls not back yet
    client: bool = False  # a call the client runs: the reply ends after this round
    failed: bool = False


def _same_words(a: str, b: str) -> bool:
    words_a, words_b = a.split(), b.split()
    return len(words_a) == len(words_b) == agreed_prefix(words_a, words_b)


class TurnController:
    """Decides about turns from the pipeline's events; see the module docstring."""

    def __init__(
        self,
        ctx: PipelineContext,
        conversation: Conversation,
        settings: TurnSettings,
        stages: Stages,
        phrase: Callable[[str], np.ndarray] | None = None,
    ) -> None:
        self.ctx = ctx
        self.conversation = conversation
        self.settings = settings
        self.stages = stages
        self.phrase = phrase  # canned phrase audio at the output rate
        self.floor = Floor(hold=settings.realtime)
        self.interruptions: list[ReplyInterrupted] = []
        self.superseded = 0
        self._paused: set[int] = set()  # turns in a pause (not yet resumed or stopped)
        self._early: dict[int, str] = {}  # turns whose reply started at the pause: its text
        self._pause_words: dict[int, str] = {}  # what a decode heard up to the pause in progress
        self._pause_scores: dict[int, float] = {}  # the semantic model's P(complete) at that pause
        self._replying: set[int] = set()  # turns whose reply is being prepared or played
        self._tokens: dict[int, list[str]] = {}  # the reply written so far
        self._written: set[int] = set()  # turns whose reply the model finished
        self._acknowledged: set[int] = set()
        self._failed: set[int] = set()  # turns whose reply is the engine's error phrase
        self._transcribing: set[int] = set()  # committed buffers whose words are not in yet
        self._awaiting_words: list[int] = []  # replies asked for before those words came
        self.client_tools: tuple[ToolSpec, ...] = ()  # a client's own tools (set_tools)
        self.tool_choice = settings.tool_choice
        self._asked: dict[int, tuple[tuple[ToolSpec, ...] | None, ToolChoice | None]] = {}  # respond()'s overrides
        self._calls: dict[int, _Calls] = {}
        self._deferred: dict[int, ToolCalled] = {}  # calls made at a pause, run once the turn is sure
        ctx.bus.route_to(self.on_event)

    @property
    def idle(self) -> bool:
        """No turn open: nobody speaking, no reply being prepared or played
        (a kiosk goes back to sleep after a while of this)."""
        return not (self.floor.user_turns or self.floor.assistant_turns or self._replying)

    # ---- the gate playback waits on ------------------------------------

    async def wait_to_play(self, turn_id: int) -> None:
        """Never talk over the user: a reply waits for the end of its own
        turn (it may have started early, at a pause) and, with hold, for any
        newer user turn to resolve."""
        await self.floor.wait_until_clear(turn_id)

    # ---- events in -----------------------------------------------------

    def on_event(self, event: Event) -> None:
        turn_id = event.turn_id
        if turn_id is None:
            return
        match event:
            case SpeechStarted():
                self._speech_started(turn_id, event)
            case SpeechPaused():
                self._paused.add(turn_id)
                self._await_the_words(turn_id)
            case SpeechResumed():
                self._paused.discard(turn_id)
                self._pause_words.pop(turn_id, None)
                self._pause_scores.pop(turn_id, None)
                if self._early.pop(turn_id, None) is not None:
                    self._drop_reply(turn_id, "the user went on speaking")
            case SpeechStopped():
                self._paused.discard(turn_id)
                self.floor.ended.add(turn_id)
                self.floor.changed()
            case TranscriptPartial() if event.covers_pause and turn_id in self._paused:
                self._at_pause(turn_id, event.text)
            case TurnEndScored() if turn_id in self._paused:
                self._scored(turn_id, event.probability)
            case TranscriptEmpty():
                self.ctx.turns.cancel(turn_id, "no words recognized")
            case TranscriptFinal() if not event.speculative:
                self._final(turn_id, event)
            case LLMToken():
                self._tokens.setdefault(turn_id, []).append(event.text)
            case LLMDone() if event.finish_reason == "error":
                self._failed.add(turn_id)  # an apology, not an answer: not for the history
            case LLMDone():
                self._written.add(turn_id)
                self.conversation.draft(turn_id, event.text)
            case ToolCalled() if not self.ctx.turns.is_cancelled(turn_id):
                self._called(turn_id, event)
            case ToolResult() if not self.ctx.turns.is_cancelled(turn_id):
                self._result(turn_id, event)
            case ReplyAudioStarted():
                if not self.ctx.turns.is_cancelled(turn_id):  # an apology after a cancel is not a reply
                    self.floor.assistant_turns.add(turn_id)
                    self._tell_vad()
            case ReplyAudioEnded():
                self.floor.assistant_turns.discard(turn_id)
                self._tell_vad()
            case BufferTranscribed():
                if event.text:
                    self.conversation.add(turn_id, user=event.text)
                self._words_in(turn_id)
                self.ctx.bus.publish(TurnCompleted(turn_id=turn_id))  # its words are all this turn had
            case TurnCompleted() | TurnCancelled() if turn_id in self._failed:
                self.conversation.settle(turn_id, failed=True)  # the user will ask again
                self._closed(turn_id)
            case TurnCompleted():
                self.conversation.settle(turn_id)
                self._closed(turn_id)
            case TurnCancelled():
                self._settle_cancelled(turn_id)
                self._closed(turn_id)
            case BudgetExceeded():
                self._budget(event)
            case _:
                pass

    # ---- the rules -----------------------------------------------------

    def _speech_started(self, turn_id: int, event: SpeechStarted) -> None:
        if self.settings.realtime:
            self.floor.user_turns.add(turn_id)
            self.floor.changed()
            if self.settings.barge_in:
                for playing in sorted(self.floor.assistant_turns - {turn_id}):
                    self.interrupt(playing, event.onset_at, turn_id)

    def _await_the_words(self, turn_id: int) -> None:
        """A pause has begun: it ends the turn only once its words are read.

        The decode of the whole utterance is started at the pause and is
        usually ready before the VAD's own hangover has passed; on a slow
        CPU it is not, and the hangover alone would cut "I need some help
        with ..." in two. So until the words arrive the pause may run a
        little longer (``await_words_ms``, short of a quick next question's
        gap); :meth:`_at_pause` then sets the real one (a complete question
        ends at once if enough silence has passed). Input faster than real
        time has no such clock: there the VAD's own hangover stands.
        """
        vad = self.stages.vad
        wait = self.settings.await_words_ms
        if self.settings.realtime and vad is not None and wait is not None:
            vad.require_silence(turn_id, wait)

    def _at_pause(self, turn_id: int, text: str) -> None:
        """The user paused and a decode heard all they said: endpointing,
        and perhaps the reply right away, during the silence hangover."""
        rule = self.settings.endpoint
        self._pause_words[turn_id] = text
        silence = rule.silence_ms(text, self._pause_scores.get(turn_id))
        vad = self.stages.vad
        if vad is not None:
            vad.require_silence(turn_id, silence)  # None: the VAD's own hangover
        if (
            self.settings.early_reply
            and rule.classify(text) != "unfinished"
            and turn_id not in self._early
            and has_words(text)
        ):
            self._early[turn_id] = text
            self.ctx.bus.publish(TranscriptFinal(turn_id=turn_id, text=text, reused=True, speculative=True))
            self._request_reply(turn_id, text)

    def _scored(self, turn_id: int, probability: float) -> None:
        """The semantic model's opinion of this pause: it may shorten the wait
        the words set (EndpointRule.silence_ms); before the words, it waits for them."""
        self._pause_scores[turn_id] = probability
        text = self._pause_words.get(turn_id)
        vad = self.stages.vad
        if text is not None and vad is not None:
            vad.require_silence(turn_id, self.settings.endpoint.silence_ms(text, probability))

    def _final(self, turn_id: int, event: TranscriptFinal) -> None:
        self._replying.add(turn_id)
        self.floor.user_turns.discard(turn_id)
        self.floor.changed()
        if self.settings.realtime:
            self._supersede(turn_id)
        early = self._early.pop(turn_id, None)
        if early is not None:
            if _same_words(early, event.text):
                deferred = self._deferred.pop(turn_id, None)
                if deferred is not None:
                    self._run_calls(turn_id, deferred.calls)
                return  # the reply under way answers exactly this
            self._drop_reply(turn_id, "the final transcript differs from the pause's")
        self._request_reply(turn_id, event.text)

    # ---- replies and their function calls ----------------------------------

    @property
    def local_tools(self) -> tuple[ToolSpec, ...]:
        """The tools this process runs (the config's, MCP servers')."""
        stage = self.stages.tools
        return tuple(stage.toolbox.specs) if stage is not None and stage.toolbox is not None else ()

    def _request_reply(self, turn_id: int, text: str) -> None:
        self.conversation.open(turn_id, text)
        tools, choice = self._asked.pop(turn_id, (None, None))
        if tools is None:
            tools = self.local_tools + self.client_tools
        if choice is None:
            choice = self.tool_choice
            if choice.mode == "auto" and self.settings.preselect and text:
                choice = preselect(tools, text) or choice
            elif choice.forced and self._answers_a_result():
                choice = NO_TOOLS  # the session's forced choice made the call this result answers: now the answer
        if not tools:
            choice = NO_TOOLS
        self._calls[turn_id] = _Calls(tools, choice)
        self._ask(turn_id, ReplyRequest(turn_id=turn_id, text=text, tools=tools, tool_choice=choice))

    def _answers_a_result(self) -> bool:
        """The reply would follow a call's result (a client sent it, then asked for a response)."""
        turns = self.conversation.turns
        return bool(turns) and turns[-1]["role"] == "tool"

    def _calls_for_the_client(self, turn_id: int) -> bool:
        """The turn's reply is (or must be) a call the client runs: it ends without words."""
        calls = self._calls.get(turn_id)
        if calls is None:
            return False
        names = {t.name for t in self.client_tools}
        forced = calls.choice.forced and any(t.name in names for t in calls.tools
                                             if calls.choice.mode != "named" or t.name == calls.choice.name)
        return calls.client or forced

    def steps_pending(self) -> bool:
        """A turn called tools and is not over: its answer is still to come
        (the LLM stage holds the end of input for it)."""
        return any(calls.rounds for calls in self._calls.values())

    def _ask(self, turn_id: int, request: ReplyRequest) -> None:
        llm = self.stages.llm
        if llm is not None:
            llm.inbox.put_nowait(request)

    def _called(self, turn_id: int, event: ToolCalled) -> None:
        """The reply called tools: record them; run ours, or end the reply for the client's."""
        self.conversation.called(turn_id, event.calls, event.text)
        calls = self._calls.setdefault(turn_id, _Calls((), NO_TOOLS))
        calls.rounds += 1
        if turn_id in self._early:  # at a pause: nothing is done on words the user may go on with
            self._deferred[turn_id] = event
            return
        self._run_calls(turn_id, event.calls)

    def _run_calls(self, turn_id: int, made: tuple[ToolCall, ...]) -> None:
        calls = self._calls[turn_id]
        ours = {t.name for t in self.local_tools}
        local = [c for c in made if c.name in ours]
        calls.client = len(local) < len(made)
        calls.pending = {c.call_id for c in local}
        stage = self.stages.tools
        for call in local:
            if stage is not None:
                stage.inbox.put_nowait(ToolRequest(turn_id=turn_id, call=call))
        if not calls.pending:
            self._ask(turn_id, ReplyRequest(turn_id=turn_id, text="", say=""))  # the client runs them

    def _result(self, turn_id: int, event: ToolResult) -> None:
        """A call came back: into the history; with every call back, the answer."""
        output = event.output if event.error is None else f"error: {event.error}"
        self.conversation.result(event.call_id, output)
        calls = self._calls.get(turn_id)
        if calls is None or event.call_id not in calls.pending:
            return
        calls.pending.discard(event.call_id)
        calls.failed |= event.error is not None
        if calls.pending:
            return
        if calls.failed:
            self._ask(turn_id, ReplyRequest(turn_id=turn_id, text="", say=self.settings.tool_apology))
        elif calls.client:
            self._ask(turn_id, ReplyRequest(turn_id=turn_id, text="", say=""))
        else:
            # Again with the results; a forced choice is not forced twice
            # (it would call forever), and the rounds are bounded.
            again = calls.choice.mode == "auto" and calls.rounds < self.settings.max_tool_rounds
            self._ask(turn_id, ReplyRequest(turn_id=turn_id, text="", tools=calls.tools,
                                            tool_choice=calls.choice if again else NO_TOOLS))

    def _drop_reply(self, turn_id: int, reason: str) -> None:
        """Throw away the reply being prepared; the user's turn goes on."""
        self.conversation.discard(turn_id)
        self._deferred.pop(turn_id, None)
        self._calls.pop(turn_id, None)
        self._tokens.pop(turn_id, None)
        self._written.discard(turn_id)
        self._failed.discard(turn_id)
        self.ctx.turns.cancel_reply(turn_id, reason)

    def _supersede(self, turn_id: int) -> None:
        """The user said more before an older reply started: drop that reply."""
        for older in sorted(t for t in self._replying if t < turn_id):
            if older in self.floor.assistant_turns:
                continue  # already playing: only a barge-in stops it
            self.conversation.commit(older, heard="")
            if self.ctx.turns.cancel(older, f"superseded: the user went on speaking (turn {turn_id})"):
                self.superseded += 1

    def interrupt(self, turn_id: int, onset_at: float, by_turn: int | None) -> ReplyInterrupted | None:
        """Barge-in: stop the turn's reply where it is, keep what was heard."""
        turn = self.ctx.turns.get(turn_id)
        playback = self.stages.playback
        if turn is None or turn.cancelled or playback is None:
            return None
        samples, stopped_at, heard, rate = playback.stop(turn_id)
        self.conversation.commit(turn_id, heard)
        event = ReplyInterrupted(
            turn_id=turn_id,
            heard_text=heard,
            played_samples=samples,
            sample_rate=rate,
            onset_at=onset_at,
            stopped_at=stopped_at,
            by_turn=by_turn,
        )
        self.interruptions.append(event)
        if len(self.interruptions) > 256:
            del self.interruptions[:128]
        self.ctx.bus.publish(event)
        self.ctx.cancel_turn(turn_id, f"interrupted by the user (turn {by_turn})")
        log.info("turn %d interrupted after %d samples; stop took %.0f ms", turn_id, samples, event.stop_ms)
        return event

    # ---- a client that drives the turns itself (the realtime endpoint) ----

    def transcribe(self, turn_id: int, pcm: np.ndarray) -> None:
        """A buffer the client committed as the user's turn: its words go into
        the history when recognition has them (:class:`BufferTranscribed`)."""
        self._transcribing.add(turn_id)
        asr = self.stages.asr
        if asr is not None:
            asr.inbox.put_nowait(TranscribeRequest(turn_id=turn_id, pcm=pcm))

    def respond(
        self, turn_id: int, tools: tuple[ToolSpec, ...] | None = None, choice: ToolChoice | None = None
    ) -> None:
        """Reply to what the history holds, for a turn with no speech of its
        own (a realtime client's ``response.create`` after text items, a
        committed buffer or a call's output): once the words of every buffer
        committed before are in, and it may play as soon as the floor is
        free. ``tools`` / ``choice``: this reply's own (None: the session's)."""
        if tools is not None or choice is not None:
            self._asked[turn_id] = (None if tools is None else self.local_tools + tools, choice)
        self._replying.add(turn_id)
        self.floor.ended.add(turn_id)
        self.floor.changed()
        if self._transcribing:
            self._awaiting_words.append(turn_id)
        else:
            self._request_reply(turn_id, "")

    def _words_in(self, turn_id: int) -> None:
        """A committed buffer is transcribed (or its turn is gone): the replies waiting on it may start."""
        self._transcribing.discard(turn_id)
        if self._transcribing:
            return
        waiting, self._awaiting_words = self._awaiting_words, []
        for waiting_turn in waiting:
            if not self.ctx.turns.is_cancelled(waiting_turn):
                self._request_reply(waiting_turn, "")

    def stop_reply(self, turn_id: int, reason: str) -> None:
        """The client stopped the reply (``response.cancel``): the history keeps
        what was played, as after a barge-in; nothing if none was."""
        playback = self.stages.playback
        if playback is not None and playback.has_started(turn_id):
            self.interrupt(turn_id, now(), None)
            return
        self.conversation.commit(turn_id, heard="")
        self.ctx.cancel_turn(turn_id, reason)

    def set_instructions(self, text: str) -> None:
        """The system prompt of every reply from now on."""
        self.conversation.system_prompt = text

    def set_tools(self, tools: tuple[ToolSpec, ...], choice: ToolChoice | None = None) -> None:
        """The client's own tools (it runs their calls), beside this process's, from now on."""
        self.client_tools = tools
        if choice is not None:
            self.tool_choice = choice

    def add_call(self, turn_id: int, call: ToolCall) -> None:
        """A call the client put into the history itself."""
        self.conversation.called(turn_id, (call,))

    def add_result(self, turn_id: int, call_id: str, output: str) -> None:
        """A call's result from the client: with the call that asked for it."""
        self.conversation.result(call_id, output, turn_id)

    def add_message(self, turn_id: int, user: str = "", reply: str | None = None) -> None:
        """A message the client put into the history itself."""
        self.conversation.add(turn_id, user, reply)

    def truncate(self, turn_id: int, heard: str) -> bool:
        """The client played only ``heard`` of a settled reply."""
        return self.conversation.truncate(turn_id, heard)

    def remove_message(self, turn_id: int, role: str) -> bool:
        """The client deleted one side of a turn from the history."""
        return self.conversation.remove(turn_id, role)

    def _budget(self, event: BudgetExceeded) -> None:
        """Apply a stage's budget policy, the moment its deadline passes."""
        turn_id = event.turn_id
        if turn_id is None or not self.settings.realtime:
            return
        playback = self.stages.playback
        if event.policy == "commit_partial":
            if self.stages.asr is not None:
                self.stages.asr.force_final(turn_id)
        elif event.policy == "acknowledge":
            turn = self.ctx.turns.get(turn_id)
            if (
                playback is None
                or self.phrase is None
                or turn_id in self._acknowledged
                or turn is None
                or turn.cancelled
                or playback.has_started(turn_id)
                or not self.floor.may_play(turn_id)  # never over the user, not even "One moment."
                or self._calls_for_the_client(turn_id)  # a response that is a client's call has no audio
            ):
                return
            self._acknowledged.add(turn_id)
            playback.interject(turn_id, self.phrase(self.settings.acknowledgement))
        elif event.policy == "cancel":
            cancelled = self.ctx.cancel_turn(turn_id, f"over the {event.stage} budget ({event.budget_ms:.0f} ms)")
            if cancelled and playback is not None and self.phrase is not None:
                playback.interject(turn_id, self.phrase(self.settings.apology))

    def _settle_cancelled(self, turn_id: int) -> None:
        """A turn cancelled with its reply unsettled (not by barge-in or
        supersede, which commit what was heard first): a reply the model had
        finished stands; one cut off mid-generation keeps what was written,
        marked interrupted."""
        if not self.conversation.is_open(turn_id):
            return
        if turn_id in self._written:
            self.conversation.commit(turn_id)
        else:
            self.conversation.commit(turn_id, heard="".join(self._tokens.get(turn_id, [])))

    def _closed(self, turn_id: int) -> None:
        if turn_id in self._awaiting_words:
            self._awaiting_words.remove(turn_id)
        if turn_id in self._transcribing:
            self._words_in(turn_id)
        self.floor.assistant_turns.discard(turn_id)
        self.floor.user_turns.discard(turn_id)
        self.floor.changed()
        for state in (self._paused, self._replying, self._written, self._acknowledged, self._failed):
            state.discard(turn_id)
        for pending in (self._calls, self._deferred, self._asked):
            pending.pop(turn_id, None)
        self._early.pop(turn_id, None)
        self._tokens.pop(turn_id, None)
        self._pause_words.pop(turn_id, None)
        self._pause_scores.pop(turn_id, None)
        self._tell_vad()

    def _tell_vad(self) -> None:
        if self.settings.realtime and self.stages.vad is not None:
            self.stages.vad.set_assistant_speaking(self.floor.assistant_speaking)
