"""What the Wyoming server announces: the ``info`` answer to ``describe``."""

from __future__ import annotations

from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    HandleModel,
    HandleProgram,
    Info,
    TtsProgram,
    TtsVoice,
)

from ...config import Config
from ...models import Models

VERSION = "0.1.0"


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
