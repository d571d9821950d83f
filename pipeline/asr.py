"""Streaming speech recognition with faster-whisper.

Whisper is not a streaming model, so the growing utterance is re-decoded on
a cadence while the user speaks. Words that two consecutive hypotheses agree
on are *committed* (LocalAgreement-2): they are the stable part of the
partial transcript and never change again.

The stage only transcribes: what the words mean for the turn (endpointing,
an early reply, a turn with no words) is the turn controller's call
(:mod:`pipeline.turns`).

The final transcript reuses that work instead of starting from scratch:

1. When the VAD reports a pause (:class:`SpeechPaused`, ~80 ms after the
   last voiced frame) a decode of the *complete* utterance starts at once,
   while the silence hangover is still running. When the hangover ends
   (:class:`SpeechStopped`) that decode is usually finished or nearly so and
   becomes the final transcript: no decode at all after the user stopped.
2. If the user spoke again after that decode started, one more decode of the
   whole utterance runs (the encoder window is at least 5 s, so a "tail
   only" decode would cost about the same). Committed words are not forced
   as a decoder prefix: an early wrong word, committed from a short buffer,
   then poisoned every later decode (seen: "Do do do ..." loops).

At the same pause, where a semantic end-of-turn model is given
(:mod:`pipeline.turns.semantic`), the stage that holds the utterance's audio
has it scored, in its own executor beside the decode, and publishes the
score (:class:`TurnEndScored`) for the turn controller.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .frames import (
    AudioFrame,
    BufferTranscribed,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    StageError,
    TranscriptEmpty,
    TranscriptFinal,
    TranscriptPartial,
    TranscribeRequest,
    TurnEndScored,
)
from .runtime import RECENT_TIMINGS, PipelineContext, Stage, run_blocking

log = logging.getLogger("pipeline.asr")


class Transcriber(Protocol):
    """Blocking speech-to-text on 16 kHz float32 audio."""

    def __call__(self, audio: np.ndarray) -> str: ...


# Whisper's own rule for "this was not speech": a high no-speech
# probability *and* an unsure decode. Non-speech that got past the VAD (a
# cough, a knock) decodes as "you" with no-speech 0.77-0.95 and average
# log-probability -1.9 to -4.0; the committed questions score 0.01-0.20 and
# -0.06 to -0.79 (measured on audio_assets/scenarios/bursts_only.wav).
NO_SPEECH_PROB = 0.6
NO_SPEECH_LOGPROB = -1.0


class WhisperTranscriber:
    """faster-whisper tuned for short utterances: greedy, no fallback, no VAD.

    Whisper's encoder is trained on 30 s windows, and faster-whisper always
    pads to 30 s: on a 2 s question most of the work is encoding silence.
    CTranslate2 accepts a shorter window, so utterances are encoded in a
    window of ``window_s`` seconds (grown to the audio plus 1 s when longer):
    on the committed questions a 10 s window gave the same transcripts as
    30 s at a fifth of the cost, and 5 s the same again at two thirds of
    10 s's. In a short window Whisper sometimes writes the utterance and
    then starts it again; :func:`drop_echoed_phrase` cuts that echo. Set
    ``window_s`` to 30 for stock faster-whisper behaviour.

    Temperature fallback is off: a second decode would double the latency.
    A decode that Whisper itself scores as no speech (see ``NO_SPEECH_PROB``)
    gives no words, so a cough that fooled the VAD ends as a dropped turn.
    """

    def __init__(self, model: Any, beam_size: int = 1, language: str = "en", window_s: float = 5.0) -> None:
        self.model = model
        self.beam_size = beam_size
        self.language = language
        self.window_s = window_s
        from faster_whisper.tokenizer import Tokenizer

        self._tokenizer = Tokenizer(
            model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language
        )
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]

    def __call__(self, audio: np.ndarray) -> str:
        text = self._decode(audio)
        return drop_echoed_phrase(collapse_repeats(text) if degenerate(text) else text)

    def _decode(self, audio: np.ndarray) -> str:
        seconds = len(audio) / 16000
        # Speech runs at 2-4 tokens a second; a cap well above that stops a
        # repetition loop early instead of decoding 200 tokens of "do do do".
        max_tokens = int(12 + 8 * seconds)
        window = max(self.window_s, seconds + 1.0)
        if window >= 30:
            return self._decode_30s(audio, max_tokens)
        import ctranslate2

        padded = np.zeros(int(window * 16000), dtype=np.float32)
        padded[: len(audio)] = audio
        features = self.model.feature_extractor(padded)[:, : int(window * 100)]
        encoded = self.model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])))
        result = self.model.model.generate(
            encoded,
            [self._prompt],
            beam_size=self.beam_size,
            max_length=max_tokens,
            suppress_blank=True,
            return_no_speech_prob=True,
            return_scores=True,
        )
        if result[0].no_speech_prob > NO_SPEECH_PROB and result[0].scores[0] < NO_SPEECH_LOGPROB:
            return ""  # Whisper's "you" on a cough, a knock or a click
        return self._tokenizer.decode(result[0].sequences_ids[0]).strip()

    def _decode_30s(self, audio: np.ndarray, max_tokens: int) -> str:
        segments, _info = self.model.transcribe(
            audio,
            max_new_tokens=max_tokens,
            language=self.language,
            beam_size=self.beam_size,
            temperature=0.0,
            without_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,
            compression_ratio_threshold=None,
            log_prob_threshold=NO_SPEECH_LOGPROB,
            no_speech_threshold=NO_SPEECH_PROB,
        )
        return " ".join(s.text.strip() for s in segments).strip()


_WORD_NORM = re.compile(r"[^\w']+")


def degenerate(text: str) -> bool:
    """Whisper's failure mode on short audio: a word or phrase repeated on and on."""
    words = [_norm(w) for w in text.split()]
    if len(words) < 6:
        return False
    run = 1
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        if run >= 4:
            return True
    data = text.encode()
    return len(data) > 40 and len(data) / len(zlib.compress(data)) > 2.4


def collapse_repeats(text: str) -> str:
    """Keep one of each run of repeated words (the best a looped decode offers)."""
    out: list[str] = []
    for word in text.split():
        if not out or _norm(out[-1]) != _norm(word):
            out.append(word)
    return " ".join(out)


def drop_echoed_phrase(text: str, min_words: int = 3) -> str:
    """Cut Whisper's echo of the utterance at its end.

    In a short encoder window Whisper sometimes writes the whole question
    and then starts it again ("What is the capital of France? What is the
    capital of France"): the echo is the first words again, repeated in
    order until the text ends. A tail of at least ``min_words`` words, and
    at least half the phrase, that repeats the text's opening words is
    dropped; the phrase before it is kept.
    """
    words = text.split()
    norm = [_norm(w) for w in words]
    for period in range(min_words, len(words) - min_words + 1):
        tail = len(words) - period
        if tail < max(min_words, (period + 1) // 2):
            break
        if all(norm[i] == norm[i - period] for i in range(period, len(words))):
            return " ".join(words[:period])
    return text


def _norm(word: str) -> str:
    return _WORD_NORM.sub("", word.lower())


def agreed_prefix(previous: list[str], current: list[str]) -> int:
    """How many leading words two hypotheses share (ignoring case/punctuation)."""
    n = 0
    for a, b in zip(previous, current):
        if _norm(a) != _norm(b):
            break
        n += 1
    return n


class Hypothesis:
    """One streaming partial hypothesis of a growing utterance: when it is due
    another decode, and the words it has committed.

    A decode is due once the utterance holds ``min_partial_audio_ms`` of
    audio, ``partial_interval_ms`` of wall time after the last one began, and
    none is running (one at a time). Words that two decodes in a row agree on
    are committed (LocalAgreement-2) and never change. The ASR stage keeps one
    per utterance, and so does the Wyoming face for a ``transcribe`` request.
    """

    def __init__(
        self, sample_rate: int = 16000, partial_interval_ms: int = 450, min_partial_audio_ms: int = 400,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = partial_interval_ms / 1000
        self._min_samples = int(min_partial_audio_ms * sample_rate / 1000)
        self._clock = clock
        self.committed: list[str] = []
        self.previous: list[str] = []  # the last decode's words
        self.last_started = 0.0  # when the last decode began (the clock's time)

    def due(self, samples: int, running: bool) -> bool:
        """Whether an utterance of ``samples`` should be decoded again now."""
        return samples >= self._min_samples and not running and self._clock() - self.last_started >= self._interval

    def started(self) -> float:
        """A decode begins now; returns when."""
        self.last_started = self._clock()
        return self.last_started

    def update(self, words: list[str]) -> list[str]:
        """A decode's words: the ones it commits (often none)."""
        agreed = agreed_prefix(self.previous, words)
        self.previous = words
        n = len(self.committed)
        if agreed > n and agreed_prefix(self.committed, words) == n:
            new = words[n:agreed]
            self.committed = self.committed + new
            return new
        return []

    def rest(self, words: list[str]) -> list[str]:
        """The final decode's words after the committed ones, where it agrees with
        them (where it does not, only the final transcript has the right text)."""
        n = len(self.committed)
        return words[n:] if agreed_prefix(self.committed, words) == n else []


@dataclass
class _Decode:
    """One decode of the utterance buffer, possibly still running."""

    task: asyncio.Task[str]
    samples: int  # how much of the buffer it saw
    audio_end_at: float  # capture stamp of the last frame it saw
    started_at: float


@dataclass
class _Utterance:
    turn_id: int
    hypothesis: Hypothesis
    chunks: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    audio_end_at: float = 0.0
    latest: _Decode | None = None
    latest_text: str | None = None
    latest_covers: float = -1.0
    scoring: asyncio.Task[float] | None = None  # the semantic model at the pause
    decodes: int = 0
    paused_at_voiced: float | None = None  # last voiced stamp while paused

    def add(self, frame: AudioFrame) -> None:
        self.chunks.append(frame.pcm)
        self.samples += len(frame.pcm)
        self.audio_end_at = frame.captured_at

    def audio(self, samples: int) -> np.ndarray:
        pcm = np.concatenate(self.chunks)[:samples] if self.chunks else np.zeros(0, np.int16)
        return pcm.astype(np.float32) / 32768.0


class ASRStage(Stage):
    """Partial transcripts while the user speaks, a final one when they stop."""

    name = "asr"
    # A partial that missed more than this much of the end of the speech is
    # too stale to be committed by the budget policy.
    stale_partial_s = 0.6
    # Deadlines on a shared Whisper (DeadlineExecutor): the decode at a
    # pause and the final are due at once, a partial while the user speaks
    # this long after its audio ends; other sessions' finals go first.
    partial_slack_s = 1.0

    def __init__(
        self,
        ctx: PipelineContext,
        transcriber: Transcriber,
        executor: Executor | None,
        sample_rate: int = 16000,
        partial_interval_ms: int = 450,
        min_partial_audio_ms: int = 400,
        clock: Callable[[], float] = time.monotonic,
        turn_scorer: Callable[[np.ndarray], float] | None = None,
        scorer_executor: Executor | None = None,
    ) -> None:
        super().__init__(ctx)
        self._transcribe = transcriber
        self._executor = executor
        self._scorer = turn_scorer  # P(complete) of the utterance's audio, or None
        self._scorer_executor = scorer_executor
        self._rate = sample_rate
        self._partials = (sample_rate, partial_interval_ms, min_partial_audio_ms, clock)
        self._utt: _Utterance | None = None
        self._final_chain: asyncio.Task[None] | None = None
        self._finalizing: dict[int, _Utterance] = {}
        self._forced: dict[int, asyncio.Event] = {}
        # Recent decode times (the benchmark reads them; a kiosk's session
        # lives for weeks, so only the last ones are kept).
        self.decode_ms: deque[float] = deque(maxlen=RECENT_TIMINGS)

    async def handle(self, item: Any) -> None:
        if isinstance(item, SpeechStarted):
            self._utt = _Utterance(item.turn_id or 0, Hypothesis(*self._partials))
            for frame in item.preroll:
                self._utt.add(frame)
        elif isinstance(item, AudioFrame):
            utt = self._utt
            if utt is None or item.turn_id != utt.turn_id:
                return
            utt.add(item)
            running = utt.latest is not None and not utt.latest.task.done()
            if utt.hypothesis.due(utt.samples, running) and not self._heard_everything(utt):
                self._start_decode(utt)
        elif isinstance(item, TranscribeRequest):
            await self._transcribe_whole(item)
        elif isinstance(item, SpeechResumed):
            utt = self._utt
            if utt is not None and item.turn_id == utt.turn_id:
                utt.paused_at_voiced = None
        elif isinstance(item, SpeechPaused):
            utt = self._utt
            if utt is not None and item.turn_id == utt.turn_id:
                utt.paused_at_voiced = item.last_voiced_at
                # Decode the complete utterance now, during the hangover.
                if utt.latest is None or utt.latest.task.done() or utt.latest.audio_end_at < item.last_voiced_at:
                    self._start_decode(utt)
                self._start_scoring(utt)
        elif isinstance(item, SpeechStopped):
            utt = self._utt
            if utt is not None and item.turn_id == utt.turn_id:
                self._utt = None
                previous = self._final_chain
                self._final_chain = asyncio.create_task(self._finalize(utt, item, previous))
                turn = self.ctx.turns.get(utt.turn_id)
                if turn is not None:
                    turn.on_cancel(self._final_chain.cancel)

    @staticmethod
    def _heard_everything(utt: _Utterance) -> bool:
        """Paused, and a decode already covers the last voiced frame: decoding
        the silence of the hangover again would only take CPU from the reply."""
        paused = utt.paused_at_voiced
        return paused is not None and utt.latest is not None and utt.latest.audio_end_at >= paused

    def _start_decode(self, utt: _Utterance) -> None:
        samples = utt.samples
        paused = utt.paused_at_voiced
        deadline = paused if paused is not None else utt.audio_end_at + self.partial_slack_s
        task = asyncio.create_task(self._decode(utt.audio(samples), deadline))
        decode = _Decode(task, samples, utt.audio_end_at, utt.hypothesis.started())
        utt.latest = decode
        utt.decodes += 1
        turn = self.ctx.turns.get(utt.turn_id)
        if turn is not None:
            turn.on_cancel(task.cancel)
        task.add_done_callback(lambda t: self._on_partial(utt, decode, t))

    def _start_scoring(self, utt: _Utterance) -> None:
        """The semantic model's opinion of the audio so far (one at a time:
        a pause that comes while the last score runs goes without)."""
        if self._scorer is None or (utt.scoring is not None and not utt.scoring.done()):
            return
        audio_end_at = utt.audio_end_at
        task = asyncio.create_task(run_blocking(self._scorer_executor, self._scorer, utt.audio(utt.samples)))
        utt.scoring = task
        turn = self.ctx.turns.get(utt.turn_id)
        if turn is not None:
            turn.on_cancel(task.cancel)

        def scored(t: asyncio.Task[float]) -> None:
            if t.cancelled():
                return
            if t.exception() is not None:
                log.warning("turn %d: the end-of-turn model failed: %s", utt.turn_id, t.exception())
                return
            if self._utt is not utt:
                return
            if utt.paused_at_voiced is None:
                return  # the user went on: an opinion of an older pause
            if audio_end_at < utt.paused_at_voiced:
                self._start_scoring(utt)  # paused again meanwhile: that pause's turn
                return
            self.publish(TurnEndScored(turn_id=utt.turn_id, probability=t.result(), audio_end_at=audio_end_at))

        task.add_done_callback(scored)

    async def _decode(self, audio: np.ndarray, deadline: float | None = None) -> str:
        started = time.perf_counter()
        text = await run_blocking(self._executor, self._transcribe, audio, deadline=deadline)
        self.decode_ms.append((time.perf_counter() - started) * 1000)
        return text

    def _on_partial(self, utt: _Utterance, decode: _Decode, task: asyncio.Task[str]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        text = task.result()
        if decode.audio_end_at >= utt.latest_covers:
            utt.latest_text = text
            utt.latest_covers = decode.audio_end_at
        words = text.split()
        # Committed words never change (the final transcript is decoded
        # afresh, so an early mistake here does not reach it).
        utt.hypothesis.update(words)
        committed = utt.hypothesis.committed
        if self._utt is utt:  # still speaking: tell the turn controller
            paused = utt.paused_at_voiced
            self.publish(
                TranscriptPartial(
                    turn_id=utt.turn_id,
                    stable=" ".join(committed),
                    unstable=" ".join(words[len(committed) :]),
                    # This decode heard all the user said before the pause.
                    covers_pause=paused is not None and decode.audio_end_at >= paused,
                )
            )

    def force_final(self, turn_id: int) -> bool:
        """Budget policy: finish the turn now with the latest transcript.

        Returns False when there is nothing to commit yet (the final decode
        then goes on and is used when it ends).
        """
        self._forced.setdefault(turn_id, asyncio.Event()).set()
        utt = self._finalizing.get(turn_id)
        return utt is not None and has_words(utt.latest_text or "")

    async def _finalize(self, utt: _Utterance, stopped: SpeechStopped, previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait({previous})  # finals leave in turn order
        started = time.perf_counter()
        self._finalizing[utt.turn_id] = utt
        forced = self._forced.setdefault(utt.turn_id, asyncio.Event())
        work = asyncio.create_task(self._final_text(utt, stopped))
        waiter = asyncio.create_task(forced.wait())
        try:
            done, _ = await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
            # Commit the latest partial only if it heard nearly everything:
            # a stale one (an early half-second) would answer the wrong question.
            fresh = utt.latest_covers >= stopped.last_voiced_at - self.stale_partial_s
            fallback = utt.latest_text if fresh else None
            if work not in done and fallback and has_words(fallback):
                text, reused, was_forced = fallback, True, True
            else:
                (text, reused), was_forced = await work, False
        except Exception as exc:
            self.publish(StageError(turn_id=utt.turn_id, stage=self.name, message=str(exc) or type(exc).__name__))
            self.ctx.cancel_turn(utt.turn_id, "speech recognition failed")
            return
        finally:
            waiter.cancel()
            if not work.done():
                work.cancel()
            self._finalizing.pop(utt.turn_id, None)
            self._forced.pop(utt.turn_id, None)
        text = text.strip()
        decode_ms = (time.perf_counter() - started) * 1000
        if not has_words(text):
            self.publish(TranscriptEmpty(turn_id=utt.turn_id))
            return
        self.publish(
            TranscriptFinal(turn_id=utt.turn_id, text=text, reused=reused, forced=was_forced, decode_ms=decode_ms)
        )

    async def _final_text(self, utt: _Utterance, stopped: SpeechStopped) -> tuple[str, bool]:
        latest = utt.latest
        # A decode that saw every voiced frame already has the answer.
        if utt.latest_text is not None and utt.latest_covers >= stopped.last_voiced_at:
            return utt.latest_text, True
        if latest is not None and latest.audio_end_at >= stopped.last_voiced_at:
            try:
                return await latest.task, True
            except Exception:
                pass
        if latest is not None and not latest.task.done():
            await asyncio.wait({latest.task})  # one decode at a time
        return await self._decode(utt.audio(utt.samples), stopped.last_voiced_at), False

    async def _transcribe_whole(self, request: TranscribeRequest) -> None:
        """A buffer the client committed itself (manual turns): its words, at once."""
        audio = request.pcm.astype(np.float32) / 32768.0
        text = (await self._decode(audio)).strip()
        self.publish(BufferTranscribed(turn_id=request.turn_id, text=text, audio_s=len(audio) / self._rate))

    async def finish(self) -> None:
        if self._final_chain is not None and not self._final_chain.done():
            await asyncio.wait({self._final_chain})


def has_words(text: str) -> bool:
    """Whether a transcript holds any word at all (not just punctuation)."""
    return any(ch.isalnum() for ch in text)
