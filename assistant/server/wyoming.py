"""The Wyoming protocol face (Home Assistant): speech-to-text, text-to-speech
and the language model as a conversation agent, over the shared models.

Every Wyoming message of the project lives here; the framing, the event
classes and the TCP/Unix server are the ``wyoming`` package's own. One
:class:`WyomingHandler` serves one connection and keeps it open between
requests (Home Assistant opens one per request and names the conversation
in each transcript's ``context``; a program may also reuse one):

* ``describe`` → ``info``: ASR (Whisper), TTS (piper) and a handle program
  (the language model), each ``installed``, all three streaming.
* ``transcribe`` + ``audio-start``/``audio-chunk``/``audio-stop`` →
  ``transcript-start``, ``transcript-chunk`` …, the legacy ``transcript``,
  ``transcript-stop``. While audio arrives the utterance is re-decoded on
  the ASR stage's cadence and words two decodes agree on go out as chunks
  at once; the final decode's remaining words follow at ``audio-stop``.
  The ``transcript`` event is authoritative: if the final decode disagrees
  with a word already sent as a chunk, only it has the right text.
* ``synthesize`` → ``audio-start``/``audio-chunk`` …/``audio-stop`` at the
  voice's own rate (16-bit mono). Streaming: ``synthesize-start``,
  ``synthesize-chunk`` … are cut into speakable chunks by the reply
  chunker's :class:`~pipeline.chunker.Segmenter` and spoken as each is
  complete; the legacy ``synthesize`` inside a stream is ignored;
  ``synthesize-stop`` → the last audio, ``audio-stop``,
  ``synthesize-stopped``.
* ``transcript`` (from Home Assistant to a handle program) → ``handled-start``,
  ``handled-chunk`` per streamed piece, the legacy ``handled``,
  ``handled-stop``; the prompt is the configured system prompt and the
  history: the ``conversation_id`` in the transcript's ``context`` (Home
  Assistant sends one and opens a connection per request) or else this
  connection's own. An engine failure → ``not-handled`` with
  ``llm.error_phrase`` (or, mid-answer, that phrase as the last chunk), and
  the exchange stays out of the history, as in a voice session.

The streaming events always bracket the legacy one, as the protocol
prescribes, so a client that knows only the legacy events reads it and
ignores the rest (the ``wyoming`` package's reader does not hand the peer's
version to a handler, so nothing can be chosen by it).

Bad input (an unknown event, missing fields, an unreadable audio format,
audio without ``transcribe``, a stream chunk without its start) is answered
with an ``error`` event and the connection goes on. A line that is not JSON
ends the connection: the package's reader gives up on the stream there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlparse

import numpy as np
from wyoming.asr import (
    Transcribe,
    Transcript,
    TranscriptChunk,
    TranscriptStart,
    TranscriptStop,
)
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    Describe,
    HandleModel,
    HandleProgram,
    Info,
    TtsProgram,
    TtsVoice,
)
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncServer, AsyncTcpServer
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
)

from audio.frame import pcm16_from_bytes
from audio.resample import Resampler
from pipeline.asr import WhisperTranscriber, agreed_prefix, has_words
from pipeline.chunker import Segmenter
from pipeline.llm import EngineUnavailable
from pipeline.runtime import iterate_blocking, run_blocking
from pipeline.tts import PiperSynthesizer
from pipeline.turns import Conversation

from ..config import Config
from ..errors import InputError
from ..models import Models

log = logging.getLogger("assistant.wyoming")

ASR_RATE = 16000  # Whisper's rate
SAMPLES_PER_CHUNK = 1024  # reply audio per audio-chunk, as wyoming-piper sends it
MAX_RATE = 384000
MAX_CHANNELS = 16
VERSION = "0.1.0"
MAX_CONVERSATIONS = 256  # histories kept by conversation_id
_connections = itertools.count(1)


class WyomingError(Exception):
    """Bad input from the client: answered with an ``error`` event, the connection goes on."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


# --------------------------------------------------------------------------
# What the server announces
# --------------------------------------------------------------------------


def build_info(models: Models, config: Config) -> Info:
    """The ``info`` answer: three programs, each installed and streaming."""
    whisper = Attribution(name="OpenAI Whisper (faster-whisper, CTranslate2)", url="https://github.com/SYSTRAN/faster-whisper")
    piper = Attribution(name="Piper (rhasspy / OHF-Voice)", url="https://github.com/OHF-Voice/piper1-gpl")
    llm = Attribution(name="Hugging Face SmolLM2 on vLLM", url="https://github.com/vllm-project/vllm")
    voice = "en_US-joe-medium" if config.tts.voice == "bundled" else config.tts.voice.rsplit("/", 1)[-1].removesuffix(".onnx")
    asr_model = "tiny.en" if config.asr.model == "bundled" else config.asr.model.rstrip("/").rsplit("/", 1)[-1]
    llm_model = getattr(models.llm, "model_name", None) or "SmolLM2-135M-Instruct"
    return Info(
        asr=[AsrProgram(
            name="voice-assistant-asr", attribution=whisper, installed=True, version=VERSION,
            description="Whisper speech recognition with streaming partial words",
            models=[AsrModel(name=asr_model, attribution=whisper, installed=True, version=None,
                             description=f"Whisper {asr_model} ({config.asr.compute_type})", languages=["en"])],
            supports_transcript_streaming=True,
        )],
        tts=[TtsProgram(
            name="voice-assistant-tts", attribution=piper, installed=True, version=VERSION,
            description="Piper speech synthesis, sentence by sentence",
            voices=[TtsVoice(name=voice, attribution=piper, installed=True, version=None,
                             description=f"piper {voice}", languages=["en_US"])],
            supports_synthesize_streaming=True,
        )],
        handle=[HandleProgram(
            name="voice-assistant", attribution=llm, installed=True, version=VERSION,
            description="The voice assistant's language model as a conversation agent (no home control)",
            models=[HandleModel(name=llm_model, attribution=llm, installed=True, version=None,
                                description="the assistant's configured system prompt and history", languages=["en"])],
            supports_handled_streaming=True,
        )],
    )


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
    conversations: OrderedDict[str, Conversation] = field(default_factory=OrderedDict)
    turns: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def new_conversation(self) -> Conversation:
        llm = self.config.llm
        return Conversation(llm.system_prompt, llm.history_tokens, self.models.llm.count_tokens)

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
    """One ``transcribe`` request: its audio at 16 kHz and the words sent so far."""

    language: str | None
    rate: int | None = None  # of the audio arriving (None before audio-start)
    resampler: Resampler | None = None
    pcm: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    decoded_at: int = 0  # samples the last partial decode started from
    partial: asyncio.Task[None] | None = None
    overflow: bool = False  # audio past vad.max_utterance_s: dropped, said once
    hypothesis: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)  # words sent as transcript-chunk
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
        self._task = asyncio.current_task()
        self._handlers.add(self)
        try:
            await super().run()
        finally:
            self._handlers.discard(self)

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
            c = self.config.chunker
            self._speech = _Speech(Segmenter(c.first_min_words, c.min_words, c.max_words, c.first_max_words))
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
        self._utterance = _Utterance(language=request.language)

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
        asr = self.config.asr
        if (
            utt.samples >= asr.min_partial_audio_ms * ASR_RATE // 1000
            and utt.samples - utt.decoded_at >= asr.partial_interval_ms * ASR_RATE // 1000
            and (utt.partial is None or utt.partial.done())
        ):
            self._start_partial(utt)

    @staticmethod
    def _append(utt: _Utterance, pcm: np.ndarray | None) -> None:
        if pcm is not None and len(pcm):
            utt.pcm.append(pcm)
            utt.samples += len(pcm)

    def _start_partial(self, utt: _Utterance) -> None:
        utt.decoded_at = utt.samples
        utt.partial = asyncio.create_task(self._partial(utt), name=f"{self.id} partial")

    async def _partial(self, utt: _Utterance) -> None:
        """Decode the audio so far; words two decodes in a row agree on are
        stable: send the new ones. One task at a time per utterance, and
        ``audio-stop`` waits for it, so chunks always precede the transcript."""
        try:
            words = (await self._decode(utt.audio())).split()
        except Exception as exc:  # a partial is only a preview: the final decode still runs
            log.warning("%s: partial decode failed: %s", self.id, exc)
            return
        agreed = agreed_prefix(utt.hypothesis, words)
        utt.hypothesis = words
        if agreed > len(utt.sent) and agreed_prefix(utt.sent, words) == len(utt.sent):
            with contextlib.suppress(ConnectionError):  # the client left: nothing to tell
                await self._send_words(utt, words[len(utt.sent):agreed])

    async def _send_words(self, utt: _Utterance, words: list[str]) -> None:
        if not utt.started:
            utt.started = True
            await self.write_event(TranscriptStart(language=utt.language or "en").event())
        await self.write_event(TranscriptChunk(text=(" " if utt.sent else "") + " ".join(words)).event())
        utt.sent.extend(words)

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
        words = text.split()
        if agreed_prefix(utt.sent, words) == len(utt.sent) and len(words) > len(utt.sent):
            await self._send_words(utt, words[len(utt.sent):])
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
        parts: list[str] = []
        failure: str | None = None
        finished = False
        stream = llm.stream(history.messages(upto=turn), request_id, session)
        started = time.perf_counter()
        try:
            async for delta, _reason in stream:
                if delta:
                    if not parts:
                        await self.write_event(HandledStart(context=transcript.context).event())
                    parts.append(delta)
                    await self.write_event(HandledChunk(text=delta).event())
            finished = True
        except EngineUnavailable as exc:
            failure = str(exc)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the engine broke mid-answer: the connection goes on
            failure = f"the language model failed: {type(exc).__name__}: {exc}"
        finally:
            await stream.aclose()
            if not finished:  # cancelled or failed: no request left running
                await llm.abort(request_id)
                history.discard(turn)
        if failure is not None:
            log.warning("%s: %s", self.id, failure)
            phrase = self.config.llm.error_phrase
            if not parts:
                await self.write_event(NotHandled(text=phrase, context=transcript.context).event())
                return
            parts.append(" " + phrase)
            await self.write_event(HandledChunk(text=" " + phrase).event())
        reply = "".join(parts).strip()
        if failure is None:
            history.draft(turn, reply)
            history.commit(turn)
        if not parts:
            await self.write_event(HandledStart(context=transcript.context).event())
        await self.write_event(Handled(text=reply, context=transcript.context).event())
        await self.write_event(HandledStop().event())
        log.info("%s: handled %r -> %r in %.0f ms", self.id, text, reply, (time.perf_counter() - started) * 1000)


def _check_format(rate: Any, width: Any, channels: Any) -> int:
    """The client's audio format, or a ``bad-audio-format`` error; returns the rate."""
    if not isinstance(rate, int) or not 1000 <= rate <= MAX_RATE:
        raise WyomingError("bad-audio-format", f"rate {rate!r}: expected 1000-{MAX_RATE} Hz")
    if width not in (1, 2, 3, 4):
        raise WyomingError("bad-audio-format", f"width {width!r}: expected 1, 2, 3 or 4 bytes a sample")
    if not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
        raise WyomingError("bad-audio-format", f"channels {channels!r}: expected 1-{MAX_CHANNELS}")
    return rate


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


@dataclass
class WyomingServer:
    """A started Wyoming server; ``stop()`` ends every connection."""

    uri: str
    server: AsyncServer
    handlers: set[WyomingHandler]

    @property
    def port(self) -> int | None:
        """The TCP port listened on (the real one when the URI asked for port 0)."""
        inner = getattr(self.server, "_server", None)
        if not isinstance(self.server, AsyncTcpServer) or inner is None or not inner.sockets:
            return None
        return int(inner.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        port = self.port
        if port is None:
            return self.uri
        return f"tcp://{self.server.host}:{port}"

    async def stop(self) -> None:
        for handler in list(self.handlers):
            handler.cancel()
        await self.server.stop()
        await asyncio.sleep(0)


def parse_uri(uri: str) -> AsyncServer:
    """The package's server for ``uri`` (tcp://HOST:PORT or unix://PATH), or an :class:`InputError`."""
    if urlparse(uri).scheme not in ("tcp", "unix"):
        raise InputError(f"--uri {uri}: expected tcp://HOST:PORT or unix://PATH (e.g. tcp://0.0.0.0:10300)")
    try:
        return AsyncServer.from_uri(uri)
    except ValueError as exc:
        raise InputError(f"--uri {uri}: {exc} (e.g. tcp://0.0.0.0:10300)") from None


async def wyoming_server(models: Models, config: Config, uri: str) -> WyomingServer:
    """Start a Wyoming server on ``uri`` over ``models`` in the running event
    loop, without blocking: the websocket server can run beside it."""
    server = parse_uri(uri)
    shared = _Shared(
        models=models,
        config=config,
        info=build_info(models, config).event(),
        transcriber=WhisperTranscriber(models.whisper, beam_size=config.asr.beam_size, language=config.asr.language,
                                       window_s=config.asr.window_s),
        synthesizer=PiperSynthesizer(models.piper, config.tts.length_scale),
    )
    handlers: set[WyomingHandler] = set()
    try:
        await server.start(partial(WyomingHandler, shared, handlers))
    except OSError as exc:
        raise InputError(f"cannot listen on {uri}: {exc.strerror or exc}") from None
    return WyomingServer(uri=uri, server=server, handlers=handlers)


# --------------------------------------------------------------------------
# voice-assistant wyoming
# --------------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_listen(server: AsyncServer, uri: str) -> None:
    """Fail before the models load (most of a minute) when the port is taken."""
    if not isinstance(server, AsyncTcpServer) or server.port == 0:
        return
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((server.host, server.port))
    except OSError as exc:
        raise InputError(f"cannot listen on {uri}: {exc.strerror or exc}") from None
    finally:
        probe.close()


def zeroconf_check() -> None:
    """``--zeroconf`` needs the optional ``zeroconf`` package."""
    import importlib.util

    if importlib.util.find_spec("zeroconf") is None:
        raise InputError("--zeroconf needs the zeroconf package: pip install zeroconf")


async def announce(port: int, name: str | None) -> Callable[[], Any]:
    """Announce ``_wyoming._tcp.local.`` for Home Assistant's discovery; returns the undo."""
    from wyoming.zeroconf import HomeAssistantZeroconf

    try:
        zc = HomeAssistantZeroconf(port=port, name=name)
        await zc.register_server()
    except OSError as exc:
        raise InputError(f"--zeroconf: cannot announce the server ({exc.strerror or exc})") from None
    _say(f"announced as {zc.name}._wyoming._tcp.local. ({zc.host}:{port})")
    return zc._aiozc.async_close


def wyoming_command(args: Any, config: Config) -> int:
    """``voice-assistant wyoming``: load the models, serve Wyoming until SIGTERM/SIGINT."""
    import os

    from ..models import load_models

    server = parse_uri(args.uri)
    _check_listen(server, args.uri)
    if args.zeroconf is not None:
        if not isinstance(server, AsyncTcpServer):
            raise InputError("--zeroconf needs a tcp:// --uri")
        zeroconf_check()
    models = load_models(config)
    try:
        code = asyncio.run(_run(args, config, models))
    finally:
        models.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as `serve`: skip seconds of interpreter teardown of torch and vLLM


async def _run(args: Any, config: Config, models: Models) -> int:
    import signal

    started = time.monotonic()
    _say("warming up...")
    await models.warm_up()
    _say(f"warm in {time.monotonic() - started:.1f} s")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await wyoming_server(models, config, args.uri)
    close_zeroconf: Callable[[], Any] | None = None
    try:
        if args.zeroconf is not None and server.port is not None:
            close_zeroconf = await announce(server.port, args.zeroconf or None)
        print(f"wyoming on {server.url}", flush=True)
        await stop.wait()
    finally:
        _say(f"shutting down ({len(server.handlers)} connection(s) open)...")
        if close_zeroconf is not None:
            await close_zeroconf()
        await server.stop()
    _say("stopped")
    return 0
