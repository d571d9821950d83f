"""One Wyoming connection: each request answered over the session's shared loops.

:class:`WyomingHandler` keeps Wyoming's request/response model (see the
package's docstring) but none of the loops behind it: the partial words of
a ``transcribe`` request come from the ASR stage's
:class:`~pipeline.asr.Hypothesis` (its cadence and LocalAgreement), an
answer from :class:`~pipeline.llm.ReplyStream` (the runaway guard, the
abort, the error phrase), its history from
:class:`~pipeline.turns.Conversation`'s life cycle, and every component
from :mod:`assistant.components`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import Describe
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from audio.frame import now, pcm16_from_bytes
from audio.resample import Resampler
from pipeline.asr import Hypothesis, WhisperTranscriber, has_words
from pipeline.chunker import Segmenter
from pipeline.llm import ReplyStream
from pipeline.runtime import iterate_blocking, run_blocking
from pipeline.tts import PiperSynthesizer
from pipeline.turns import Conversation

from ...components import conversation_of, segmenter_of, synthesizer_of, transcriber_of
from ...config import Config
from ...models import Models
from ..limits import TokenBucket
from .info import build_info
from .wire import WireError, read_event

log = logging.getLogger("assistant.wyoming")

ASR_RATE = 16000  # Whisper's rate
SAMPLES_PER_CHUNK = 1024  # reply audio per audio-chunk, as wyoming-piper sends it
MAX_RATE = 384000
MAX_CHANNELS = 16
MAX_CONVERSATIONS = 256  # histories kept by conversation_id
LINGER_S = 1.0  # after a header the stream cannot follow: input dropped this long before the close
_connections = itertools.count(1)


class WyomingError(Exception):
    """Bad input from the client: answered with an ``error`` event, the connection goes on."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


# --------------------------------------------------------------------------
# Per-connection state
# --------------------------------------------------------------------------


@dataclass
class _Shared:
    """What every connection of one server borrows (built once)."""

    models: Models
    config: Config
    info: Event
    transcriber: WhisperTranscriber
    synthesizer: PiperSynthesizer
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # wyoming.allowed_clients, parsed once
    conversations: OrderedDict[str, Conversation] = field(default_factory=OrderedDict)
    turns: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def of(cls, models: Models, config: Config) -> _Shared:
        return cls(models=models, config=config, info=build_info(models, config).event(),
                   transcriber=transcriber_of(models, config), synthesizer=synthesizer_of(models.piper, config),
                   allowed=tuple(ipaddress.ip_network(c, strict=False) for c in config.wyoming.allowed_clients))

    def new_conversation(self) -> Conversation:
        return conversation_of(self.models, self.config)

    def hypothesis(self) -> Hypothesis:
        """A transcribe request's partial words, on the ASR stage's cadence (asr.partial_interval_ms)."""
        a = self.config.asr
        return Hypothesis(ASR_RATE, a.partial_interval_ms, a.min_partial_audio_ms)

    def conversation(self, conversation_id: str) -> Conversation:
        """The history of a client's ``conversation_id`` (Home Assistant opens a
        connection per request and names the conversation in ``context``);
        the least recently used beyond ``MAX_CONVERSATIONS`` are forgotten."""
        found = self.conversations.pop(conversation_id, None) or self.new_conversation()
        self.conversations[conversation_id] = found
        while len(self.conversations) > MAX_CONVERSATIONS:
            self.conversations.popitem(last=False)
        return found


@dataclass
class _Utterance:
    """One ``transcribe`` request: its audio at 16 kHz and its partial hypothesis
    (whose committed words are those sent as ``transcript-chunk``)."""

    language: str | None
    hypothesis: Hypothesis
    rate: int | None = None  # of the audio arriving (None before audio-start)
    resampler: Resampler | None = None
    pcm: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    partial: asyncio.Task[None] | None = None
    overflow: bool = False  # audio past vad.max_utterance_s: dropped, said once
    words_sent: int = 0  # words sent as transcript-chunk
    started: bool = False  # transcript-start sent

    def audio(self) -> np.ndarray:
        pcm = np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.int16)
        return pcm.astype(np.float32) / 32768.0


@dataclass
class _Speech:
    """One streamed ``synthesize-start`` … ``synthesize-stop`` request."""

    segmenter: Segmenter
    audio_started: bool = False


class WyomingHandler(AsyncEventHandler):
    """One Wyoming connection: answers each event, never drops it on bad input."""

    def __init__(self, shared: _Shared, handlers: set[WyomingHandler], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.shared = shared
        self.config = shared.config
        self.id = f"wy{next(_connections)}"
        self._handlers = handlers
        self._task: asyncio.Task[None] | None = None
        self._utterance: _Utterance | None = None
        self._speech: _Speech | None = None
        self.history = shared.new_conversation()  # without a conversation_id

    async def run(self) -> None:
        """Events read through :mod:`.wire`'s limits, not the package's reader
        (which trusts a header's lengths); a refused peer, a header it cannot
        follow or a reset connection each end with one log line, no traceback."""
        self._task = asyncio.current_task()
        refusal = self._refusal()
        self._handlers.add(self)
        try:
            if refusal is not None:
                log.info("%s: refused: %s", self.id, refusal[1])
                await self._error(*refusal)
                return
            server = self.config.server
            rate = TokenBucket(server.max_messages_per_s, server.message_burst)
            while True:
                try:
                    try:
                        async with asyncio.timeout(server.idle_timeout_s):
                            event = await read_event(self.reader)
                    except TimeoutError:
                        raise WireError("idle-timeout", f"nothing received for {server.idle_timeout_s:g} s "
                                        "(server.idle_timeout_s)", fatal=True) from None
                    if event is not None and not rate.take(1, now()):
                        raise WireError("message-rate", f"more than {server.max_messages_per_s:g} events a "
                                        f"second (server.max_messages_per_s, bursts of {server.message_burst})",
                                        fatal=True)
                except WireError as exc:
                    log.info("%s: %s: %s", self.id, exc.code, exc.text)
                    await self._error(exc.code, exc.text)
                    if exc.fatal:
                        await self._linger()
                        break
                    continue
                if event is None or not await self.handle_event(event):
                    break
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("%s: connection lost (%s)", self.id, type(exc).__name__)
        finally:
            self._handlers.discard(self)
            await self.disconnect()
            self.writer.close()

    async def _linger(self) -> None:
        """Half-close and drop what the client still sends, for a moment, before the close:
        closing with its bytes unread resets the connection, and a reset can
        discard the ``error`` that says why before the client reads it."""
        with contextlib.suppress(Exception):
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(LINGER_S):
                while await self.reader.read(65536):
                    pass

    def _refusal(self) -> tuple[str, str] | None:
        """Why this connection may not go on (an address not allowed, too many open), or None."""
        w = self.config.wyoming
        peer = self.writer.get_extra_info("peername")
        if self.shared.allowed and isinstance(peer, tuple):  # TCP; a Unix socket has its file permissions
            try:
                address = ipaddress.ip_address(str(peer[0]).split("%")[0])
            except ValueError:
                address = None
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            if address is None or not any(address in network for network in self.shared.allowed):
                return "not-allowed", f"{peer[0]} is not in wyoming.allowed_clients"
        if len(self._handlers) >= w.max_connections:
            return "too-many-connections", f"{w.max_connections} connections are open (wyoming.max_connections)"
        return None

    def cancel(self) -> None:
        """Server shutdown: stop whatever this connection is doing."""
        if self._task is not None:
            self._task.cancel()

    async def disconnect(self) -> None:
        if self._utterance is not None and self._utterance.partial is not None:
            self._utterance.partial.cancel()
        self._utterance = None

    async def handle_event(self, event: Event) -> bool:
        try:
            await self._dispatch(event)
        except WyomingError as exc:
            log.info("%s: %s: %s", self.id, exc.code, exc.text)
            await self._error(exc.code, exc.text)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a missing or mistyped field
            text = f"malformed {event.type!r} event: {type(exc).__name__}: {exc}"
            log.info("%s: %s", self.id, text)
            await self._error("bad-event", text)
        except ConnectionError:  # the client left mid-answer: end quietly
            return False
        except Exception as exc:  # a bug: one line to the client and the log, the connection goes on
            log.error("%s: %s failed: %s", self.id, event.type, exc, exc_info=exc)
            await self._error("internal-error", f"{event.type} failed: {type(exc).__name__}: {exc}")
        return True

    async def _error(self, code: str, text: str) -> None:
        with contextlib.suppress(ConnectionError):
            await self.write_event(Error(text=text, code=code).event())

    async def _dispatch(self, event: Event) -> None:
        kind = event.type
        if Describe.is_type(kind):
            await self.write_event(self.shared.info)
        elif Ping.is_type(kind):
            await self.write_event(Pong(text=Ping.from_event(event).text).event())
        elif Transcribe.is_type(kind):
            await self._transcribe(Transcribe.from_event(event))
        elif AudioStart.is_type(kind):
            self._audio_start(AudioStart.from_event(event))
        elif AudioChunk.is_type(kind):
            await self._audio_chunk(AudioChunk.from_event(event))
        elif AudioStop.is_type(kind):
            await self._audio_stop()
        elif Transcript.is_type(kind):
            await self._handle(Transcript.from_event(event))
        elif Synthesize.is_type(kind):
            if self._speech is None:  # inside a stream it repeats the chunks: ignored
                await self._synthesize(Synthesize.from_event(event))
        elif SynthesizeStart.is_type(kind):
            SynthesizeStart.from_event(event)
            self._speech = _Speech(segmenter_of(self.config))
        elif SynthesizeChunk.is_type(kind):
            await self._synthesize_chunk(SynthesizeChunk.from_event(event))
        elif SynthesizeStop.is_type(kind):
            await self._synthesize_stop()
        else:
            raise WyomingError("unknown-event", f"unknown or unsupported event {kind!r}")

    # ---- speech to text -----------------------------------------------------

    async def _transcribe(self, request: Transcribe) -> None:
        if request.language and not request.language.lower().startswith("en"):
            raise WyomingError("unsupported-language", f"language {request.language!r}: this model speaks English (en)")
        await self.disconnect()  # a new request replaces an unfinished one
        self._utterance = _Utterance(language=request.language, hypothesis=self.shared.hypothesis())

    def _utterance_for_audio(self, what: str) -> _Utterance:
        if self._utterance is None:
            raise WyomingError("no-transcribe", f"{what} without a transcribe request: send transcribe first")
        return self._utterance

    def _audio_start(self, start: AudioStart) -> None:
        utt = self._utterance_for_audio("audio-start")
        utt.rate = _check_format(start.rate, start.width, start.channels)

    async def _audio_chunk(self, chunk: AudioChunk) -> None:
        utt = self._utterance_for_audio("audio-chunk")
        rate = _check_format(chunk.rate, chunk.width, chunk.channels)
        if utt.overflow:
            return
        pcm = pcm16_from_bytes(chunk.audio, chunk.width, chunk.channels)
        if utt.resampler is None or utt.resampler.in_rate != rate:
            self._append(utt, utt.resampler.flush() if utt.resampler is not None else None)
            utt.resampler = Resampler(rate, ASR_RATE)
        utt.rate = rate
        self._append(utt, utt.resampler.process(pcm))
        limit = self.config.vad.max_utterance_s * ASR_RATE
        if utt.samples > limit:
            # Home Assistant reads nothing but the transcript: it still gets
            # one, of the first max_utterance_s, at audio-stop.
            utt.overflow = True
            raise WyomingError("audio-too-long", f"audio after {self.config.vad.max_utterance_s:g} s is ignored "
                                                 "(vad.max_utterance_s)")
        if utt.hypothesis.due(utt.samples, running=utt.partial is not None and not utt.partial.done()):
            self._start_partial(utt)

    @staticmethod
    def _append(utt: _Utterance, pcm: np.ndarray | None) -> None:
        if pcm is not None and len(pcm):
            utt.pcm.append(pcm)
            utt.samples += len(pcm)

    def _start_partial(self, utt: _Utterance) -> None:
        utt.hypothesis.started()
        utt.partial = asyncio.create_task(self._partial(utt), name=f"{self.id} partial")

    async def _partial(self, utt: _Utterance) -> None:
        """Decode the audio so far and send the words it commits. One task at a
        time per utterance, and ``audio-stop`` waits for it, so chunks always
        precede the transcript."""
        try:
            words = (await self._decode(utt.audio())).split()
        except Exception as exc:  # a partial is only a preview: the final decode still runs
            log.warning("%s: partial decode failed: %s", self.id, exc)
            return
        committed = utt.hypothesis.update(words)
        if committed:
            with contextlib.suppress(ConnectionError):  # the client left: nothing to tell
                await self._send_words(utt, committed)

    async def _send_words(self, utt: _Utterance, words: list[str]) -> None:
        if not utt.started:
            utt.started = True
            await self.write_event(TranscriptStart(language=utt.language or "en").event())
        await self.write_event(TranscriptChunk(text=(" " if utt.words_sent else "") + " ".join(words)).event())
        utt.words_sent += len(words)

    async def _decode(self, audio: np.ndarray) -> str:
        return await run_blocking(self.shared.models.asr_executor, self.shared.transcriber, audio)

    async def _audio_stop(self) -> None:
        utt = self._utterance_for_audio("audio-stop")
        self._utterance = None  # the next request starts afresh, whatever happens below
        if utt.resampler is not None:
            self._append(utt, utt.resampler.flush())
        if utt.partial is not None and not utt.partial.done():
            with contextlib.suppress(Exception):
                await utt.partial  # the executor runs one decode at a time anyway
        text = await self._decode(utt.audio()) if utt.samples else ""
        text = text if has_words(text) else ""
        rest = utt.hypothesis.rest(text.split())
        if rest:
            await self._send_words(utt, rest)
        elif not utt.started:
            utt.started = True
            await self.write_event(TranscriptStart(language=utt.language or "en").event())
        await self.write_event(Transcript(text=text, language=utt.language or "en").event())
        await self.write_event(TranscriptStop().event())
        log.info("%s: transcript %r (%.1f s of audio)", self.id, text, utt.samples / ASR_RATE)

    # ---- text to speech -----------------------------------------------------

    async def _synthesize(self, request: Synthesize) -> None:
        if not request.text.strip():
            raise WyomingError("empty-text", "synthesize: no text to speak")
        await self._speak(request.text, start=True)
        await self.write_event(AudioStop().event())

    async def _speak(self, text: str, start: bool) -> None:
        """Synthesize ``text`` sentence by sentence and send it as it comes."""
        synth = self.shared.synthesizer
        rate = synth.sample_rate
        if start:
            await self.write_event(AudioStart(rate=rate, width=2, channels=1).event())
        async for pcm in iterate_blocking(self.shared.models.tts_executor, lambda: synth.synthesize(text)):
            data = np.asarray(pcm, dtype="<i2")
            for offset in range(0, len(data), SAMPLES_PER_CHUNK):
                piece = data[offset:offset + SAMPLES_PER_CHUNK].tobytes()
                await self.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=piece).event())

    def _stream(self, what: str) -> _Speech:
        if self._speech is None:
            raise WyomingError("no-synthesize-start", f"{what} without synthesize-start")
        return self._speech

    async def _synthesize_chunk(self, chunk: SynthesizeChunk) -> None:
        speech = self._stream("synthesize-chunk")
        for text in speech.segmenter.push(chunk.text):
            await self._speak(text, start=not speech.audio_started)
            speech.audio_started = True

    async def _synthesize_stop(self) -> None:
        speech = self._stream("synthesize-stop")
        self._speech = None
        for text in speech.segmenter.flush():
            await self._speak(text, start=not speech.audio_started)
            speech.audio_started = True
        if not speech.audio_started:
            rate = self.shared.synthesizer.sample_rate
            await self.write_event(AudioStart(rate=rate, width=2, channels=1).event())
        await self.write_event(AudioStop().event())
        await self.write_event(SynthesizeStopped().event())

    # ---- the language model as a conversation agent ---------------------------

    async def _handle(self, transcript: Transcript) -> None:
        text = transcript.text.strip()
        if not text:
            raise WyomingError("empty-text", "transcript: no text to answer")
        llm = self.shared.models.llm
        turn = next(self.shared.turns)
        request_id = f"{self.id}-t{turn}"
        conversation_id = (transcript.context or {}).get("conversation_id")
        if isinstance(conversation_id, str) and conversation_id:
            history, session = self.shared.conversation(conversation_id), conversation_id
        else:
            history, session = self.history, self.id
        history.open(turn, text)
        messages = history.messages(upto=turn)
        phrase = self.config.llm.error_phrase
        started = time.perf_counter()
        answered = False  # handled-start sent
        try:
            async with ReplyStream(llm, messages, request_id, session, error_reply=phrase) as reply:
                async for delta in reply:
                    if reply.failure is not None and not answered:
                        break  # the engine failed before a word: the phrase is not-handled's text
                    if not answered:
                        answered = True
                        await self.write_event(HandledStart(context=transcript.context).event())
                    await self.write_event(HandledChunk(text=delta).event())
        except BaseException:  # the client left or the server stops mid-answer: no exchange is kept
            history.discard(turn)
            raise
        if reply.failure is None:
            history.draft(turn, reply.text)
        history.settle(turn, failed=reply.failure is not None)
        if reply.failure is not None and not answered:
            log.warning("%s: not handled: %s", self.id, reply.failure)
            await self.write_event(NotHandled(text=phrase, context=transcript.context).event())
            return
        if not answered:
            await self.write_event(HandledStart(context=transcript.context).event())
        await self.write_event(Handled(text=reply.text, context=transcript.context).event())
        await self.write_event(HandledStop().event())
        log.info("%s: handled %r -> %r in %.0f ms", self.id, text, reply.text, (time.perf_counter() - started) * 1000)


def _check_format(rate: Any, width: Any, channels: Any) -> int:
    """The client's audio format, or a ``bad-audio-format`` error; returns the rate."""
    if not isinstance(rate, int) or not 1000 <= rate <= MAX_RATE:
        raise WyomingError("bad-audio-format", f"rate {rate!r}: expected 1000-{MAX_RATE} Hz")
    if width not in (1, 2, 3, 4):
        raise WyomingError("bad-audio-format", f"width {width!r}: expected 1, 2, 3 or 4 bytes a sample")
    if not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
        raise WyomingError("bad-audio-format", f"channels {channels!r}: expected 1-{MAX_CHANNELS}")
    return rate
