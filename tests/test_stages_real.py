"""Each stage on its own, with the real model, on the committed speech."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from audio.framing import file_source
from pipeline.asr import ASRStage, WhisperTranscriber
from pipeline.frames import (
    END,
    LLMDone,
    LLMToken,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    TextChunk,
    TranscriptFinal,
    TranscriptPartial,
    TTSAudio,
    TTSDone,
)
from pipeline.llm import LLMStage
from pipeline.turns import Conversation, Stages, TurnController, TurnSettings
from pipeline.runtime import Channel, PipelineContext, Stage, connect, run_stages
from pipeline.tts import PiperSynthesizer, TTSStage
from pipeline.vad import SileroOpinion, VADSettings, VADStage

from fakes import context
from helpers import ASSETS, expected_text, load_pcm, question_files, transcribe, word_error_rate, words

pytestmark = pytest.mark.slow


async def drive(stages: list[Stage], items: list[Any]) -> list[Any]:
    """Push items (then END) through connected stages; return what came out."""
    ctx = stages[0].ctx
    connect(ctx, stages)
    sink: Channel[Any] = Channel("sink", 100_000)
    stages[-1].outbox = sink

    async def feed() -> None:
        for item in items:
            await stages[0].inbox.put(item)
        await stages[0].inbox.put(END)

    await asyncio.gather(feed(), run_stages(stages))
    return [await sink.get() for _ in range(len(sink))]


def vad_stage(ctx: PipelineContext, config: Any, silero: bool = True) -> VADStage:
    v = config.vad
    return VADStage(
        ctx,
        VADSettings(config.audio.frame_ms, v.aggressiveness, v.min_speech_ms, v.silence_ms, v.pause_ms, v.preroll_ms),
        silero=SileroOpinion().max_probability if silero else None,
    )


async def frames_of(pcm: np.ndarray) -> list[Any]:
    return [f async for f in file_source(pcm, 16000, 20, realtime=False)]


@pytest.mark.parametrize("wav", question_files(), ids=lambda p: p.stem)
def test_vad_finds_one_turn_where_the_speech_is(wav: Any, config: Any, manifest: dict[str, Any]) -> None:
    ctx, events = context()
    asyncio.run(drive([vad_stage(ctx, config)], asyncio.run(frames_of(load_pcm(wav)))))
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert len(starts) == len(stops) == 1
    begin, end = manifest["files"][f"questions/{wav.name}"]["speech_s"]
    assert abs(starts[0].onset_position / 16000 - begin) < 0.2
    assert abs(stops[0].last_voiced_position / 16000 - end) < 0.25
    # the pre-roll reaches back before the onset, so the first syllable is kept
    assert starts[0].preroll[0].position < starts[0].onset_position
    assert any(isinstance(e, SpeechPaused) for e in events)


def test_vad_ignores_silence_and_short_bursts(config: Any) -> None:
    rng = np.random.default_rng(0)
    pcm = (rng.normal(0, 30, 16000 * 3)).astype(np.int16)
    # three 100-200 ms noise bursts (a knock, a cough-like blip)
    for start, ms in ((8000, 100), (24000, 150), (36000, 200)):
        n = 16 * ms
        pcm[start : start + n] = (rng.normal(0, 6000, n) * np.hanning(n)).astype(np.int16)
    ctx, events = context()
    asyncio.run(drive([vad_stage(ctx, config)], asyncio.run(frames_of(pcm))))
    assert not [e for e in events if isinstance(e, SpeechStarted)]
    silence = load_pcm(ASSETS / "misc" / "silence.wav")
    ctx, events = context()
    asyncio.run(drive([vad_stage(ctx, config)], asyncio.run(frames_of(silence))))
    assert not [e for e in events if isinstance(e, SpeechStarted)]


def test_vad_splits_two_turns(config: Any) -> None:
    ctx, events = context()
    pcm = load_pcm(ASSETS / "conversation" / "two_turns.wav")
    asyncio.run(drive([vad_stage(ctx, config)], asyncio.run(frames_of(pcm))))
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert len(starts) == 2 and starts[0].turn_id != starts[1].turn_id


@pytest.mark.parametrize("wav", question_files(), ids=lambda p: p.stem)
def test_asr_streams_partials_and_a_final(wav: Any, config: Any, models: Any, run: Any) -> None:
    ctx, events = context()
    asr = ASRStage(ctx, WhisperTranscriber(models.whisper), models.asr_executor)

    async def stream() -> None:
        # Real-time pace, so partial decodes happen while "the user speaks".
        vad = vad_stage(ctx, config)
        connect(ctx, [vad, asr])
        asr.outbox = Channel("sink", 10_000)

        async def feed() -> None:
            async for f in file_source(load_pcm(wav), 16000, 20, realtime=True):
                await vad.inbox.put(f)
            await vad.inbox.put(END)

        await asyncio.gather(feed(), run_stages([vad, asr]))

    run(stream())
    # The final is an event for the turn controller (nothing flows on from ASR).
    finals = [e for e in events if isinstance(e, TranscriptFinal)]
    assert len(finals) == 1
    final = finals[0]
    assert word_error_rate(expected_text(wav), final.text) <= 0.2, final.text
    stopped = next(e for e in events if isinstance(e, SpeechStopped))
    assert final.at >= stopped.at
    assert asr.decode_ms, "nothing was decoded while the user spoke"
    # the stable prefix only ever grows
    partials = [e for e in events if isinstance(e, TranscriptPartial)]
    stable = [p.stable.split() for p in partials]
    for a, b in zip(stable, stable[1:]):
        assert b[: len(a)] == a


def test_asr_partials_arrive_while_the_user_speaks(config: Any, models: Any, run: Any) -> None:
    """On the longest question, partial transcripts come before speech ends."""
    wav = max(question_files(), key=lambda p: len(load_pcm(p)))
    ctx, events = context()
    asr = ASRStage(ctx, WhisperTranscriber(models.whisper), models.asr_executor, partial_interval_ms=300)
    vad = vad_stage(ctx, config)

    async def stream() -> None:
        connect(ctx, [vad, asr])
        asr.outbox = Channel("sink", 10_000)

        async def feed() -> None:
            async for f in file_source(load_pcm(wav), 16000, 20, realtime=True):
                await vad.inbox.put(f)
            await vad.inbox.put(END)

        await asyncio.gather(feed(), run_stages([vad, asr]))

    run(stream())
    stopped = next(e for e in events if isinstance(e, SpeechStopped))
    partials = [e for e in events if isinstance(e, TranscriptPartial) and e.at < stopped.last_voiced_at]
    assert partials, f"no partial transcript while speaking ({len(asr.decode_ms)} decodes)"
    # the last partial before the end already holds words of the question
    assert set(words(partials[-1].text)) & set(words(expected_text(wav)))


def test_llm_streams_a_spoken_style_answer(models: Any, config: Any, run: Any) -> None:
    ctx, events = context()
    conversation = Conversation(config.llm.system_prompt, config.llm.history_tokens, models.llm.count_tokens)
    turn = ctx.turns.new()
    stage = LLMStage(ctx, models.llm, conversation, "test")
    # The turn controller opens the exchange, asks for the reply and keeps it.
    TurnController(ctx, conversation, TurnSettings(), Stages(llm=stage))
    ctx.bus.publish(TranscriptFinal(turn_id=turn.id, text="What is the capital of France?"))
    out = run(drive([stage], []))
    tokens = [o for o in events if isinstance(o, LLMToken)]
    done = [o for o in out if isinstance(o, LLMDone)]
    assert len(tokens) >= 2 and len(done) == 1
    assert "".join(t.text for t in tokens).strip() == done[0].text
    assert "paris" in done[0].text.lower()
    assert [m["role"] for m in conversation.messages()] == ["system", "user", "assistant"]
    assert models.llm.pending_requests() == 0


def test_the_cpu_engine_runs_with_the_preloaded_allocator_and_openmp(models: Any, config: Any) -> None:
    """llm.preload: auto puts tcmalloc and Intel OpenMP into the engine core's
    process (where both are installed), which is what the README measured."""
    import psutil

    from assistant.engine.local import has_gpu, preload_libraries

    libs = preload_libraries()
    if has_gpu() or config.llm.engine != "local" or not libs:
        pytest.skip("a GPU engine, a remote engine, or tcmalloc / libiomp5 not installed here")
    cores = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join(p.cmdline())]
    assert cores, "no vLLM engine core process"
    mapped = {str(Path(m.path).resolve()) for m in cores[0].memory_maps() if m.path.startswith("/")}
    for lib in libs:  # maps name the file a symlink points to (libtcmalloc_minimal.so.4.5.10)
        assert str(Path(lib).resolve()) in mapped, f"{lib} not loaded by the engine"
    # ... and only there: later children of this process (a browser, PulseAudio) start without them.
    import os

    assert not any(Path(lib).name in os.environ.get("LD_PRELOAD", "") for lib in libs)


def test_the_engine_reuses_the_system_prompt_from_its_prefix_cache(models: Any, config: Any, run: Any) -> None:
    """llm.block_size: the prefix cache keeps whole blocks only, so with a
    block smaller than the system prompt a new question skips its prefill."""
    from assistant.engine.local import VLLMModel

    if not isinstance(models.llm, VLLMModel):
        pytest.skip("a remote engine: its server keeps its own cache")
    from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

    def hits() -> float:
        return sum(m.value for m in get_metrics_snapshot() if isinstance(m, Counter) and m.name == "vllm:prefix_cache_hits")

    async def ask(question: str) -> None:
        messages = [{"role": "system", "content": config.llm.system_prompt}, {"role": "user", "content": question}]
        async for _text, _finish in models.llm.stream(messages, f"prefix-{question}"):
            pass

    run(ask("Which planet is the biggest?"))
    before = hits()
    run(ask("Name one colour of the rainbow."))
    prompt_tokens = len(models.llm.tokenizer(models.llm.prompt([{"role": "system", "content": config.llm.system_prompt}]))["input_ids"])
    assert prompt_tokens >= config.llm.block_size
    assert hits() - before >= prompt_tokens // config.llm.block_size * config.llm.block_size


def test_the_engine_runs_compiled_by_default(models: Any, config: Any) -> None:
    """llm.enforce_eager: false, what the README measured: the session's
    engine is torch.compiled (vLLM's compilation mode is not NONE)."""
    from assistant.engine.local import VLLMModel

    if not isinstance(models.llm, VLLMModel):
        pytest.skip("a remote engine: its server chose")
    assert config.llm.enforce_eager is False
    vllm_config = models.llm.engine.vllm_config
    assert vllm_config.model_config.enforce_eager is False
    from vllm.config import CompilationMode

    assert vllm_config.compilation_config.mode != CompilationMode.NONE


def test_conversation_history_stays_within_its_token_budget(models: Any) -> None:
    conversation = Conversation("Be brief.", budget=60, count_tokens=models.llm.count_tokens)
    for i in range(20):
        conversation.open(i, f"Question number {i} about something rather long and wordy?")
        conversation.draft(i, f"Answer number {i}, which is also not short at all.")
        conversation.commit(i)
    messages = conversation.messages()
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["role"] == "user" and "19" in messages[-1]["content"]
    used = sum(models.llm.count_tokens(m["content"]) + 4 for m in messages[1:])
    assert used <= 60 and len(messages) < 41


def test_tts_speaks_each_chunk_at_the_output_rate(models: Any, config: Any, run: Any) -> None:
    ctx, events = context()
    turn = ctx.turns.new()
    stage = TTSStage(ctx, PiperSynthesizer(models.piper), models.tts_executor, 16000)
    chunks = [
        TextChunk(turn_id=turn.id, text="The capital of France is Paris,", index=0),
        TextChunk(turn_id=turn.id, text="a city of lights.", index=1, last=True),
    ]
    out = run(drive([stage], chunks))
    audio = [o for o in out if isinstance(o, TTSAudio)]
    assert audio and all(a.sample_rate == 16000 for a in audio)
    assert [a.chunk_index for a in audio] == sorted(a.chunk_index for a in audio)
    pcm = np.concatenate([a.pcm for a in audio])
    assert 1.5 < len(pcm) / 16000 < 6
    assert any(isinstance(o, TTSDone) for o in out)
    heard = transcribe(models, pcm)
    assert word_error_rate("The capital of France is Paris, a city of lights.", heard) <= 0.3, heard
