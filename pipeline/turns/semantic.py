"""Smart Turn v3.2: does the user's voice sound finished? A second opinion for endpointing.

The words rule (:mod:`pipeline.turns.endpointing`) reads the transcript; this
model listens to the last 8 s of the utterance itself (intonation, the
drawn-out "umm" of someone still thinking) and gives the probability that
the turn is complete. It is an opinion to combine with the words, never a
verdict: it has scored plainly complete questions "incomplete" (see
:meth:`EndpointRule.silence_ms`, which only lets it shorten a wait the words
already allow).

The model (``smart-turn-v3.2-cpu.onnx``, 8.7 MB, BSD-2-Clause) and its
feature extractor (a numpy module of Whisper-style log-mel features) ship in
the ``pipecat-ai`` wheel, installed without its dependencies; both are read
from there (:func:`assistant.models.smart_turn_files`), nothing of pipecat is
imported as a package and nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SmartTurn"]

SAMPLE_RATE = 16000
WINDOW_S = 8  # the model's input: the last 8 s, zeros in front of a shorter turn


class SmartTurn:
    """Probability that an utterance is a complete turn (16 kHz float audio).

    Blocking, thread-safe for one caller at a time: run it in an executor.
    ``calls`` and ``cpu_s`` say what it has cost so far.
    """

    def __init__(self, model: Path, features: Path, threads: int = 1) -> None:
        import onnxruntime

        spec = importlib.util.spec_from_file_location("smart_turn_features", features)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the Smart Turn features from {features}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self._features: Any = module.compute_whisper_log_mel_features
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle: no busy core
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(str(model), sess_options=options,
                                                     providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.calls = 0
        self.cpu_s = 0.0

    def __call__(self, audio: np.ndarray) -> float:
        """P(complete) for ``audio`` (float32 in [-1, 1] at 16 kHz, the turn so far)."""
        started = time.thread_time()
        n = WINDOW_S * SAMPLE_RATE
        x = np.asarray(audio, dtype=np.float32)[-n:]
        if len(x) < n:
            x = np.pad(x, (n - len(x), 0))  # silence before a short turn, as the model was trained
        features = self._features(x, do_normalize=True)[np.newaxis]
        (out,) = self._session.run(None, {self._input: features})
        self.calls += 1
        self.cpu_s += time.thread_time() - started
        return float(np.asarray(out).reshape(-1)[0])
