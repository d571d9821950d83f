"""The naive sequential cascade: the baseline the streaming pipeline beats.

Same models, same end-of-speech rule, but every stage waits for the previous
one to finish completely, the way a first voice assistant is usually wired:

    VAD hangover ends -> stock faster-whisper on the whole utterance (30 s
    window) -> the FULL LLM reply -> the WHOLE reply synthesized -> playback

Every stamp is measured on the pipeline clock (``time.monotonic``). The only
simulated part is the user speaking: the utterance is released frame by
frame at real-time pace, through the product's own :class:`VADStage`, so the
end of speech and the hangover are found exactly as in the product and the
stamps line up with a streaming run of the same file on the same axis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np

from audio.framing import file_source
from audio.resample import Resampler
from pipeline.chunker import clean_text
from pipeline.frames import Event, SpeechStarted, SpeechStopped, now
from pipeline.metrics import NAIVE_MILESTONES, NAIVE_SPANS, milestone_ms, span_ms, summarize_spans
from pipeline.playback import TimelineOutput
from pipeline.runtime import EventBus, PipelineContext, TurnRegistry
from pipeline.vad import VADStage

from ..components import conversation_of, synthesizer_of, vad_settings
from ..config import Config

# Its milestones and spans are those of pipeline/metrics.py marked naive
# (NAIVE_MILESTONES, NAIVE_SPANS): where a span is the streaming pipeline's
# too, it has the same name, so the two line up side by side.
__all__ = ["naive_turn", "run_naive"]

_request_ids = itertools.count(1)


async def _listen(
    models: Any, config: Config, pcm: np.ndarray, t0: float, output: TimelineOutput
) -> tuple[dict[str, float], tuple[int, int], int] | None:
    """Play the utterance at real-time pace through the product's VAD.

    Returns the stamps (speech_start, speech_end, vad_end), the sample range
    the product's recognizer would have buffered (pre-roll .. the frame that
    closed the turn) and the turn id; None when the VAD finds no speech.
    """
    rate = config.audio.input_rate
    bus = EventBus()
    bus.subscribe(output.observe)  # anchors the reply on the input's timeline
    ctx = PipelineContext(bus=bus, turns=TurnRegistry(bus))
    silero = models.silero.max_probability if models.silero is not None else None
    vad = VADStage(ctx, vad_settings(config, silero is not None), silero=silero)  # the product's: turns end alike
    events: list[Event] = []
    bus.subscribe(lambda e: events.append(e) if isinstance(e, SpeechStarted | SpeechStopped) else None)

    end_position = len(pcm)
    source = file_source(pcm, rate, config.audio.frame_ms, realtime=True, start=t0)
    async with contextlib.aclosing(source) as frames:
        async for frame in frames:
            await vad.handle(frame)
            if any(isinstance(e, SpeechStopped) for e in events):
                end_position = frame.end_position
                break
        else:
            await vad.finish()  # input ended inside the hangover: close like the product
    started = next((e for e in events if isinstance(e, SpeechStarted)), None)
    stopped = next((e for e in events if isinstance(e, SpeechStopped)), None)
    if started is None or stopped is None:
        return None
    stamps = {"speech_start": started.onset_at, "speech_end": stopped.last_voiced_at, "vad_end": stopped.at}
    begin = started.preroll[0].position if started.preroll else started.onset_position
    return stamps, (begin, end_position), int(stopped.turn_id or 0)


async def _listen_known_end(
    config: Config, pcm: np.ndarray, t0: float, speech_end_s: float, output: TimelineOutput
) -> tuple[dict[str, float], tuple[int, int], int]:
    """The end of speech is given: wait out its real-time end plus the hangover."""
    rate = config.audio.input_rate
    hangover = config.vad.silence_ms / 1000
    speech_end = t0 + speech_end_s
    position = int(round(speech_end_s * rate))
    output.observe(SpeechStopped(turn_id=1, last_voiced_at=speech_end, last_voiced_position=position))
    delay = speech_end + hangover - now()
    if delay > 0:
        await asyncio.sleep(delay)
    stamps = {"speech_end": speech_end, "vad_end": now()}
    return stamps, (0, min(len(pcm), position + int(hangover * rate))), 1


def _turn_dict(transcript: str, reply: str, stamps: dict[str, float], t0: float, status: str) -> dict[str, Any]:
    """The product's turn-report shape, stamps in ms from the utterance start."""
    latency = span_ms(stamps, NAIVE_SPANS)
    return {
        "pipeline": "naive",
        "status": status,
        "transcript": transcript,
        "reply": reply,
        "milestones_ms": milestone_ms(stamps, NAIVE_MILESTONES, t0),
        "latency_ms": latency,
        "voice_to_voice_ms": latency.get("voice_to_voice"),
    }


async def naive_turn(
    models: Any, config: Config, pcm: np.ndarray, speech_end_s: float | None = None
) -> dict[str, Any]:
    """One utterance through the naive cascade; a turn-report-shaped dict.

    ``pcm`` is 16 kHz int16 mono holding one question with silence around
    it. ``speech_end_s`` is where its last voiced sample lies (seconds), when
    already known; None finds it with the product's VAD at real-time pace.
    ``status`` is "completed", or "no_speech" / "no_words" / "no_reply"
    when the turn stopped early (then later milestones are absent).
    """
    loop = asyncio.get_running_loop()
    rate = config.audio.input_rate
    output = TimelineOutput(config.audio.output_rate, rate)
    t0 = now()
    if speech_end_s is None:
        heard = await _listen(models, config, pcm, t0, output)
        if heard is None:
            return _turn_dict("", "", {}, t0, "no_speech")
    else:
        heard = await _listen_known_end(config, pcm, t0, speech_end_s, output)
    stamps, (begin, end), turn_id = heard

    # 1. Speech recognition, only now, on the whole utterance: stock
    #    faster-whisper (30 s window, its default fallbacks).
    audio = pcm[begin:end].astype(np.float32) / 32768.0

    def transcribe() -> str:
        segments, _info = models.whisper.transcribe(
            audio, language=config.asr.language, beam_size=config.asr.beam_size
        )
        return " ".join(s.text.strip() for s in segments).strip()

    transcript = await loop.run_in_executor(models.asr_executor, transcribe)
    stamps["asr_final"] = now()
    if not any(ch.isalnum() for ch in transcript):
        return _turn_dict(transcript, "", stamps, t0, "no_words")

    # 2. The full reply before any speech.
    conversation = conversation_of(models, config)
    conversation.open(None, transcript)
    request_id = f"naive-{next(_request_ids)}"
    parts: list[str] = []
    finished = False
    try:
        async for delta, _reason in models.llm.stream(conversation.messages(), request_id):
            if delta:
                stamps.setdefault("llm_first_token", now())
                parts.append(delta)
        finished = True
    finally:
        if not finished:
            await models.llm.abort(request_id)
    stamps["llm_done"] = now()
    reply = "".join(parts).strip()
    text = clean_text(reply)
    if not text:
        return _turn_dict(transcript, reply, stamps, t0, "no_reply")

    # 3. The whole reply synthesized (and brought to the output rate, as the
    #    product's TTS stage does) before playback starts.
    synth = synthesizer_of(models.piper, config)

    def synthesize() -> np.ndarray:
        pieces = list(synth.synthesize(text))
        resampler = Resampler(synth.sample_rate, config.audio.output_rate)
        whole = np.concatenate(pieces) if pieces else np.zeros(0, np.int16)
        return np.concatenate([resampler.process(whole), resampler.flush()])

    reply_pcm = await loop.run_in_executor(models.tts_executor, synthesize)
    stamps["tts_done"] = now()

    # 4. Playback: the same virtual output the product's file mode uses.
    at, _position = output.write(turn_id, reply_pcm)
    # The output rounds its start to a sample; never stamp it before the audio existed.
    stamps["first_audio_out"] = max(at, stamps["tts_done"])
    stamps["reply_end"] = await output.drain(turn_id)
    result = _turn_dict(transcript, reply, stamps, t0, "completed")
    result["reply_audio_seconds"] = round(len(reply_pcm) / config.audio.output_rate, 3)
    return result


async def run_naive(config: Config, models: Any, files: list[Path]) -> dict[str, Any]:
    """The naive cascade over each file, one warm-up turn excluded (like run_bench)."""
    from audio.files import decode_file

    def load(path: Path) -> np.ndarray:
        return decode_file(path, config.audio.input_rate, config.audio.max_input_seconds)

    print(f"naive warm-up turn: {files[0].name} (not counted)", file=sys.stderr)
    await naive_turn(models, config, load(files[0]))
    measured: list[dict[str, Any]] = []
    for path in files:
        turn = await naive_turn(models, config, load(path))
        turn["file"] = str(path)
        print(
            f"  naive {path.name}: {turn['transcript']!r} -> voice-to-voice {turn['voice_to_voice_ms']} ms",
            file=sys.stderr,
        )
        if turn["status"] != "no_speech":
            measured.append(turn)
    return {"measured_turns": len(measured), "stages_ms": summarize_spans(measured, NAIVE_SPANS), "turns": measured}
