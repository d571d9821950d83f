"""Turn-taking rules of the turn controller, on the plumbing alone (no
models): barge-in cuts the reply at the played position and the history
with it; a reply waits while the user speaks again, is superseded if the new
turn has words and plays if it was noise; the VAD's stricter barge-in onset
(set by the controller while a reply plays) rejects blips and quiet sound.

The same rules run with the real models in test_scenarios.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.frames import (
    AudioFrame,
    LLMDone,
    ReplyInterrupted,
    SpeechStarted,
    SpeechStopped,
    TextChunk,
    TranscriptFinal,
    TTSAudio,
    TurnCancelled,
    now,
)
from pipeline.playback import PlaybackStage, TimelineOutput
from pipeline.turns import Conversation, Stages, TurnController, TurnSettings
from pipeline.vad import VADSettings, VADStage

from fakes import ScriptedClassifier, context

RATE = 16000


class Rig:
    """A bus, a playback stage on a virtual timeline, the turn controller."""

    def __init__(self) -> None:
        self.ctx, self.events = context()
        self.output = TimelineOutput(RATE, RATE, realtime=False)
        self.ctx.bus.subscribe(self.output.observe)
        self.playback = PlaybackStage(self.ctx, self.output)
        self.conversation = Conversation("system", 1000, lambda text: len(text.split()))
        self.rules = TurnController(
            self.ctx, self.conversation, TurnSettings(early_reply=False), Stages(playback=self.playback)
        )
        self.playback.gate = self.rules
        self.floor = self.rules.floor

    def user_turn(self, text: str) -> int:
        turn = self.ctx.turns.new()
        t = now()
        self.ctx.bus.publish(SpeechStarted(turn_id=turn.id, onset_at=t - 1, onset_position=0))
        self.ctx.bus.publish(SpeechStopped(turn_id=turn.id, last_voiced_at=t, last_voiced_position=RATE))
        self.ctx.bus.publish(TranscriptFinal(turn_id=turn.id, text=text))  # opens the exchange
        return turn.id

    def reply(self, turn_id: int, chunks: list[str]) -> list[TTSAudio]:
        """The reply's chunks as text events, and one second of audio each."""
        audio = []
        for index, text in enumerate(chunks):
            self.ctx.bus.publish(TextChunk(turn_id=turn_id, text=text, index=index))
            pcm = np.full(RATE, 1000, np.int16)
            audio.append(TTSAudio(turn_id=turn_id, pcm=pcm, sample_rate=RATE, chunk_index=index))
        self.ctx.bus.publish(LLMDone(turn_id=turn_id, text=" ".join(chunks), tokens=len(chunks), finish_reason="stop"))
        return audio

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def test_barge_in_stops_the_reply_and_cuts_history_at_the_played_position(run: Callable[..., Any]) -> None:
    async def scenario() -> Rig:
        rig = Rig()
        turn = rig.user_turn("Tell me about owls.")
        for piece in rig.reply(turn, ["Owls hunt at night and", "they see very well."]):
            await rig.playback.handle(piece)
        assert rig.floor.assistant_speaking
        await asyncio.sleep(0.5)  # half of the first chunk has played
        second = rig.ctx.turns.new()
        onset = now() - 0.25
        rig.ctx.bus.publish(
            SpeechStarted(turn_id=second.id, onset_at=onset, onset_position=0, barge_in=True)
        )
        return rig

    rig = run(scenario())
    (event,) = rig.of(ReplyInterrupted)
    assert event.turn_id == 1 and event.by_turn == 2
    assert 0.4 * RATE <= event.played_samples <= 0.7 * RATE
    assert event.heard_text == "Owls hunt"  # 2 of the chunk's 5 words had played
    assert 240 <= event.stop_ms <= 400
    assert rig.ctx.turns.is_cancelled(1)
    assert not rig.floor.assistant_speaking
    # The virtual speaker kept only what had played.
    assert len(rig.output.render()) <= 0.7 * RATE + RATE  # the anchor is one second in
    history = rig.conversation.messages()
    assert history[-1] == {"role": "assistant", "content": "Owls hunt —"}


def test_reply_waits_while_the_user_speaks_again_and_is_superseded_by_words(run: Callable[..., Any]) -> None:
    async def scenario() -> Rig:
        rig = Rig()
        turn = rig.user_turn("What time is it?")
        (piece,) = rig.reply(turn, ["It is noon."])
        second = rig.ctx.turns.new()
        rig.ctx.bus.publish(SpeechStarted(turn_id=second.id, onset_at=now(), onset_position=0))
        task = asyncio.create_task(rig.playback.handle(piece))
        rig.ctx.turns.get(turn).on_cancel(task.cancel)
        await asyncio.sleep(0.2)
        assert not task.done(), "the reply must wait while the user speaks"
        rig.ctx.bus.publish(SpeechStopped(turn_id=second.id, last_voiced_at=now(), last_voiced_position=0))
        rig.ctx.bus.publish(TranscriptFinal(turn_id=second.id, text="And the date?"))
        await asyncio.sleep(0.05)
        assert task.cancelled()
        return rig

    rig = run(scenario())
    assert rig.ctx.turns.is_cancelled(1) and "superseded" in rig.ctx.turns.get(1).cancel_reason
    assert rig.rules.superseded == 1
    assert len(rig.output.render()) == 0, "the superseded reply never played"
    # No unheard reply: both of the user's turns, and no assistant message
    # (the controller opened the second turn's exchange at its final).
    assert [(m["role"], m["content"]) for m in rig.conversation.messages()[1:]] == [
        ("user", "What time is it?"),
        ("user", "And the date?"),
    ]


def test_held_reply_plays_when_the_new_turn_was_only_noise(run: Callable[..., Any]) -> None:
    async def scenario() -> Rig:
        rig = Rig()
        turn = rig.user_turn("What time is it?")
        (piece,) = rig.reply(turn, ["It is noon."])
        noise = rig.ctx.turns.new()
        rig.ctx.bus.publish(SpeechStarted(turn_id=noise.id, onset_at=now(), onset_position=0))
        task = asyncio.create_task(rig.playback.handle(piece))
        await asyncio.sleep(0.1)
        assert not task.done()
        rig.ctx.turns.cancel(noise.id, "no words recognized")
        await asyncio.wait_for(task, 1)
        return rig

    rig = run(scenario())
    assert not rig.ctx.turns.is_cancelled(1)
    assert len(rig.output.render()) >= RATE
    assert any(isinstance(e, TurnCancelled) and e.turn_id == 2 for e in rig.events)


def _vad_rig(speaking: bool) -> tuple[VADStage, list[SpeechStarted]]:
    ctx, _ = context()
    settings = VADSettings(min_speech_ms=160, barge_in_min_speech_ms=200, barge_in_min_rms_dbfs=-45.0)
    vad = VADStage(ctx, settings, classifier=ScriptedClassifier(), silero=lambda pcm: np.full(len(pcm) // 512, 0.9))
    vad.set_assistant_speaking(speaking)
    starts: list[SpeechStarted] = []
    ctx.bus.subscribe(lambda e: starts.append(e) if isinstance(e, SpeechStarted) else None)
    return vad, starts


def _feed(vad: VADStage, pieces: list[tuple[float, float]], run: Callable[..., Any]) -> None:
    """Feed (seconds, amplitude in dBFS or -inf for silence) pieces as 20 ms frames."""

    async def go() -> None:
        position = 0
        t = now()
        for seconds, dbfs in pieces:
            for _ in range(int(round(seconds / 0.02))):
                amplitude = 0 if dbfs == float("-inf") else 32767 * 10 ** (dbfs / 20) * np.sqrt(2)
                pcm = (amplitude * np.sin(np.arange(320) * 0.3)).astype(np.int16)
                t += 0.02
                await vad.handle(AudioFrame(pcm=pcm, sample_rate=RATE, captured_at=t, position=position))
                position += 320

    run(go())


def test_barge_in_onset_needs_more_speech_than_a_burst(run: Callable[..., Any]) -> None:
    vad, starts = _vad_rig(speaking=True)
    _feed(vad, [(0.5, float("-inf")), (0.18, -20), (0.6, float("-inf"))], run)
    assert starts == [], "a 180 ms burst must not interrupt the assistant"
    _feed(vad, [(0.4, -20)], run)
    assert len(starts) == 1 and starts[0].barge_in


def test_barge_in_onset_ignores_quiet_sound(run: Callable[..., Any]) -> None:
    vad, starts = _vad_rig(speaking=True)
    _feed(vad, [(1.0, -55)], run)
    assert starts == [], "sound under barge_in.min_rms_dbfs must not interrupt"


def test_normal_onset_when_the_assistant_is_silent(run: Callable[..., Any]) -> None:
    vad, starts = _vad_rig(speaking=False)
    _feed(vad, [(0.18, -55)], run)
    assert len(starts) == 1 and not starts[0].barge_in


def test_a_conversation_of_weeks_keeps_its_recent_exchanges_only() -> None:
    """A kiosk never ends its conversation: settled exchanges past
    keep_exchanges are forgotten; the prompt (within its budget) is unchanged."""
    conversation = Conversation("system", 40, lambda text: len(text.split()))
    for turn in range(1, 1001):
        conversation.open(turn, f"question {turn}")
        conversation.draft(turn, f"answer {turn}")
        conversation.commit(turn)
    turns = conversation.turns
    assert len(turns) == 2 * conversation.keep_exchanges
    assert turns[0]["content"] == f"question {1001 - conversation.keep_exchanges}"
    messages = conversation.messages()
    assert messages[-1] == {"role": "assistant", "content": "answer 1000"} and len(messages) < 20
    conversation.open(1001, "still open")  # an open exchange is never dropped
    assert conversation.is_open(1001)


def test_a_reply_asked_for_before_a_committed_buffer_is_transcribed_waits_for_its_words() -> None:
    """A client that ends its turns itself: commit, then response.create at once. The reply
    starts when the buffer's words are in the history, never before; a cancelled one never."""
    from types import SimpleNamespace

    from pipeline.frames import BufferTranscribed, ReplyRequest, TranscribeRequest, TurnCompleted
    from pipeline.runtime import Channel

    async def main() -> None:
        ctx, events = context()
        conversation = Conversation("system", 1000, lambda text: len(text.split()))
        asr, llm = SimpleNamespace(inbox=Channel("asr")), SimpleNamespace(inbox=Channel("llm"))
        controller = TurnController(
            ctx, conversation, TurnSettings(early_reply=False), Stages(asr=asr, llm=llm)  # type: ignore[arg-type]
        )
        spoken = ctx.turns.new().id
        controller.transcribe(spoken, np.zeros(1600, np.int16))
        request = await asr.inbox.get()
        assert isinstance(request, TranscribeRequest) and request.turn_id == spoken and len(request.pcm) == 1600
        reply, dropped = ctx.turns.new().id, ctx.turns.new().id
        controller.respond(reply)
        controller.respond(dropped)
        ctx.turns.cancel(dropped, "cancelled by the client")
        assert len(llm.inbox) == 0  # waiting for the words
        ctx.bus.publish(BufferTranscribed(turn_id=spoken, text="What time is it?", audio_s=0.1))
        assert conversation.messages(upto=reply)[1:] == [{"role": "user", "content": "What time is it?"}]
        asked = await llm.inbox.get()
        assert isinstance(asked, ReplyRequest) and asked.turn_id == reply and len(llm.inbox) == 0
        assert any(isinstance(e, TurnCompleted) and e.turn_id == spoken for e in events)  # its words were all of it
        again = ctx.turns.new().id
        controller.respond(again)  # nothing being transcribed: at once
        assert (await llm.inbox.get()).turn_id == again

    asyncio.run(main())
