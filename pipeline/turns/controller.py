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
==========================  ==================================================

A client that drives the turns itself (the realtime face's manual turns,
text items) does so through the session, whose verbs land here:
:meth:`transcribe`, :meth:`respond`, :meth:`stop_reply`, :meth:`add_message`,
:meth:`truncate`, :meth:`remove_message`, :meth:`set_instructions`.

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
    TranscribeRequest,
    TurnEndScored,
    now,
)
from ..runtime import PipelineContext
from .endpointing import EndpointRule
from .floor import Floor
from .history import Conversation

if TYPE_CHECKING:
    from ..asr import ASRStage
    from ..llm import LLMStage
    from ..playback import PlaybackStage
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


@dataclass
class Stages:
    """The stages the controller gives commands to (any may be absent in a test rig)."""

    vad: VADStage | None = None
    asr: ASRStage | None = None
    llm: LLMStage | None = None
    playback: PlaybackStage | None = None


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
                return  # the reply under way answers exactly this
            self._drop_reply(turn_id, "the final transcript differs from the pause's")
        self._request_reply(turn_id, event.text)

    def _request_reply(self, turn_id: int, text: str) -> None:
        self.conversation.open(turn_id, text)
        llm = self.stages.llm
        if llm is not None:
            llm.inbox.put_nowait(ReplyRequest(turn_id=turn_id, text=text))

    def _drop_reply(self, turn_id: int, reason: str) -> None:
        """Throw away the reply being prepared; the user's turn goes on."""
        self.conversation.discard(turn_id)
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

    def respond(self, turn_id: int) -> None:
        """Reply to what the history holds, for a turn with no speech of its
        own (a realtime client's ``response.create`` after text items or a
        committed buffer): once the words of every buffer committed before are
        in, and it may play as soon as the floor is free."""
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
        self._early.pop(turn_id, None)
        self._tokens.pop(turn_id, None)
        self._pause_words.pop(turn_id, None)
        self._pause_scores.pop(turn_id, None)
        self._tell_vad()

    def _tell_vad(self) -> None:
        if self.settings.realtime and self.stages.vad is not None:
            self.stages.vad.set_assistant_speaking(self.floor.assistant_speaking)
