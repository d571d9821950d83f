"""How well do the bundled wake-word models hear this project's voices?

Measures, for each model (default okay_nabu and hey_jarvis):

* detection rate on the wake phrase spoken by the voices this project can
  make: the bundled piper voice at several speeds (length_scale) and
  espeak-ng voices (if installed) at several speeds, each after a little
  silence, clean, with seeded white or pink noise at 20 and 10 dB SNR, and
  through a simulated room's reverberation (audio/room.py);
* confusable phrases spoken by piper ("Okay, no problem.", "Hey, Travis."):
  how many wake it (fewer is better; not part of the rate);
* false wakes per hour on non-wake speech: the committed questions, the
  conversation and the scenario recordings, looped to ``--hours`` of audio
  (the first pass clean, every later pass with fresh seeded pink noise at
  20 dB SNR, so the passes are not identical);
* CPU time per 80 ms of audio, fed in 20 ms frames as the microphone does,
  and the cost of reset().

Prints a table; ``--json OUT`` writes the figures. Piper samples its noise
(noise_scale) at random, so piper takes differ slightly from run to run.

    .venv/bin/python scripts/wake_eval.py --hours 1 --json wake.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from audio.files import read_wav  # noqa: E402
from audio.resample import Resampler  # noqa: E402
from audio.room import RoomEcho  # noqa: E402
from pipeline.wake import (  # noqa: E402
    SAMPLE_RATE,
    WakeWordDetector,
    WakeWordSettings,
    available_models,
)

ASSETS = ROOT / "audio_assets"
FRAME = 320  # 20 ms at 16 kHz: what the microphone stage delivers
PHRASES = {
    "okay_nabu": ["Okay Nabu.", "Okay, Nabu!", "okay nabu"],
    "hey_jarvis": ["Hey Jarvis.", "Hey, Jarvis!", "hey jarvis"],
    "alexa": ["Alexa.", "Alexa!", "alexa"],
    "hey_mycroft": ["Hey Mycroft.", "Hey, Mycroft!", "hey mycroft"],
}
CONFUSABLE = {
    "okay_nabu": ["Okay, no problem.", "Okay, now you.", "Okay, Nemo.", "Oh, kabuki.", "Okay, new boots."],
    "hey_jarvis": ["Hey, Travis.", "Hey, jars.", "Harvest.", "Hey, Marvin.", "Hey, Charles."],
    "alexa": ["Alexander.", "A Lexus.", "Electra.", "Alex, hi."],
    "hey_mycroft": ["Hey, Microsoft.", "Hey, my craft.", "Minecraft.", "Hey, Mike."],
}
PIPER_SPEEDS = (0.8, 1.0, 1.2)
ESPEAK_VOICES = ("en-us+m3", "en+f3", "en-gb+m1", "en-us+f2")
ESPEAK_SPEEDS = (130, 165)
CONDITIONS = ("clean", "white 20 dB", "pink 20 dB", "white 10 dB", "pink 10 dB", "reverb", "reverb + pink 10 dB")


# ---------------------------------------------------------------------------
# Audio the project can make


def to_16k(chunks: list[np.ndarray], rate: int) -> np.ndarray:
    """int16 chunks at ``rate`` as one 16 kHz signal (the project's resampler)."""
    resampler = Resampler(rate, SAMPLE_RATE)
    out = [resampler.process(c) for c in chunks]
    out.append(resampler.flush())
    return np.concatenate(out)


def speak_piper(voice: Any, text: str, length_scale: float = 1.0) -> np.ndarray:
    """``text`` spoken by a loaded piper voice, at 16 kHz."""
    from pipeline.tts import PiperSynthesizer

    synth = PiperSynthesizer(voice, length_scale=length_scale)
    return to_16k(list(synth.synthesize(text)), synth.sample_rate)


def speak_espeak(text: str, voice: str, speed: int) -> np.ndarray:
    """``text`` spoken by espeak-ng, at 16 kHz."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "espeak.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), text],
                       check=True, capture_output=True)
        pcm, rate = read_wav(out)
    return to_16k([pcm], rate)


def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power white or pink (1/f power) noise."""
    white = rng.standard_normal(n)
    if kind == "white":
        return white
    spectrum = np.fft.rfft(white)
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    pink = np.fft.irfft(spectrum / np.sqrt(f), n)
    pink[:] -= pink.mean()
    return pink / np.sqrt(np.mean(pink**2))


def speech_power(pcm: np.ndarray) -> float:
    """Mean power of the speech part (20 ms blocks within 30 dB of the loudest)."""
    x = pcm.astype(np.float64)
    blocks = x[: len(x) // FRAME * FRAME].reshape(-1, FRAME)
    power = np.mean(blocks**2, axis=1)
    return float(np.mean(power[power > power.max() * 1e-3]))


def degrade(pcm: np.ndarray, condition: str, seed: int) -> np.ndarray:
    """The phrase as the microphone would hear it under ``condition``."""
    x = pcm.astype(np.float64)
    if condition.startswith("reverb"):
        room = RoomEcho(SAMPLE_RATE, delay_ms=0.0, gain_db=0.0, rt60_ms=450.0, seed=seed, drr_db=0.0)
        x = np.convolve(x, room.response)[: len(x)]
    rng = np.random.default_rng(seed)
    for kind in ("white", "pink"):
        if kind in condition:
            snr_db = float(condition.split()[-2])
            power = speech_power(pcm)
            x = x + noise(kind, len(x), rng) * np.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


# ---------------------------------------------------------------------------
# Measurements


def run_stream(detector: WakeWordDetector, pcm: np.ndarray) -> int:
    """Feed ``pcm`` in 20 ms frames from a fresh stream; the detections."""
    detector.reset()
    hits = 0
    for start in range(0, len(pcm), FRAME):
        hits += detector.process(pcm[start : start + FRAME])
    return hits


@dataclass
class Take:
    voice: str  # "piper 1.0", "espeak en-us+m3 130"
    text: str
    pcm: np.ndarray = field(repr=False)


def wake_takes(model: str, voice: Any, use_espeak: bool) -> list[Take]:
    """The wake phrase in every voice, each after 0.3-1.0 s of silence and followed by 1 s."""
    takes: list[Take] = []
    phrases = PHRASES[model]
    for speed in PIPER_SPEEDS:
        for text in phrases:
            takes.append(Take(f"piper {speed}", text, speak_piper(voice, text, speed)))
    if use_espeak:
        for name in ESPEAK_VOICES:
            for speed in ESPEAK_SPEEDS:
                text = phrases[0]
                takes.append(Take(f"espeak {name} {speed}", text, speak_espeak(text, name, speed)))
    for i, take in enumerate(takes):
        lead = np.zeros(int(SAMPLE_RATE * (0.3 + 0.1 * (i % 8))), np.int16)
        take.pcm = np.concatenate([lead, take.pcm, np.zeros(SAMPLE_RATE, np.int16)])
    return takes


def detection_rates(detector: WakeWordDetector, takes: list[Take]) -> dict[str, Any]:
    """Per condition and per voice family: detected / total, and extra detections."""
    rows: dict[str, Any] = {}
    for c, condition in enumerate(CONDITIONS):
        by_voice: dict[str, list[int]] = {}
        peaks: list[float] = []
        missed: list[str] = []
        extra = 0
        for t, take in enumerate(takes):
            hits = run_stream(detector, degrade(take.pcm, condition, seed=1000 * c + t))
            family = take.voice.split()[0]
            by_voice.setdefault(family, []).append(int(hits > 0))
            extra += max(0, hits - 1)
            peaks.append(round(detector.peak_probability, 3))
            if not hits:
                missed.append(f"{take.voice}: {take.text}")
        rows[condition] = {
            family: {"detected": sum(v), "total": len(v)} for family, v in by_voice.items()
        } | {"extra_detections": extra, "min_peak": min(peaks), "peaks": peaks, "missed": missed}
    return rows


def non_wake_audio() -> tuple[np.ndarray, list[str]]:
    """The committed non-wake speech, one signal, and the files it came from."""
    files = sorted((ASSETS / "questions").glob("*.wav")) + sorted((ASSETS / "conversation").glob("*.wav"))
    files += sorted((ASSETS / "scenarios").glob("*.wav"))
    parts = []
    for path in files:
        pcm, rate = read_wav(path)
        parts.append(to_16k([pcm], rate) if rate != SAMPLE_RATE else pcm)
        parts.append(np.zeros(SAMPLE_RATE // 2, np.int16))
    return np.concatenate(parts), [str(p.relative_to(ROOT)) for p in files]


def false_wakes(detector: WakeWordDetector, audio: np.ndarray, hours: float) -> dict[str, Any]:
    """Detections on ``audio`` looped to ``hours`` (one stream, no reset between passes)."""
    target = int(hours * 3600 * SAMPLE_RATE)
    passes = max(1, -(-target // len(audio)))
    detector.reset()
    cpu0, samples0 = detector.cpu_s, detector.samples
    wall0 = time.perf_counter()
    clean_hits = hits = 0
    fed = 0
    for k in range(passes):
        pcm = audio if k == 0 else degrade(audio, "pink 20 dB", seed=k)
        pcm = pcm[: target - fed] if k == passes - 1 else pcm
        n = 0
        for start in range(0, len(pcm), FRAME):
            n += detector.process(pcm[start : start + FRAME])
        hits += n
        clean_hits += n if k == 0 else 0
        fed += len(pcm)
    scanned_h = fed / SAMPLE_RATE / 3600
    cpu = detector.cpu_s - cpu0
    blocks_80ms = (detector.samples - samples0) / (0.08 * SAMPLE_RATE)
    return {
        "unique_audio_s": round(len(audio) / SAMPLE_RATE, 1),
        "hours_scanned": round(scanned_h, 3),
        "false_wakes": hits,
        "false_wakes_first_clean_pass": clean_hits,
        "false_wakes_per_hour": round(hits / scanned_h, 2),
        "cpu_ms_per_80ms": round(1000 * cpu / blocks_80ms, 3),
        "real_time_factor": round(cpu / (fed / SAMPLE_RATE), 5),
        "wall_s": round(time.perf_counter() - wall0, 1),
    }


def reset_ms(detector: WakeWordDetector, n: int = 20) -> float:
    started = time.thread_time()
    for _ in range(n):
        detector.reset()
    return round(1000 * (time.thread_time() - started) / n, 2)


def evaluate(models: list[str], hours: float, use_espeak: bool) -> dict[str, Any]:
    from assistant.config import load_config
    from assistant.models import load_piper

    voice = load_piper(load_config())
    audio, files = non_wake_audio()
    result: dict[str, Any] = {"conditions": list(CONDITIONS), "non_wake_files": files, "models": {}}
    for model in models:
        detector = WakeWordDetector(WakeWordSettings(model=model))
        takes = wake_takes(model, voice, use_espeak)
        confusable = [speak_piper(voice, text) for text in CONFUSABLE[model]]
        pad = np.zeros(SAMPLE_RATE // 2, np.int16)
        woken = [text for text, pcm in zip(CONFUSABLE[model], confusable)
                 if run_stream(detector, np.concatenate([pad, pcm, pad]))]
        result["models"][model] = {
            "wake_word": detector.wake_word,
            "threshold": detector.threshold,
            "takes": [{"voice": t.voice, "text": t.text} for t in takes],
            "detection": detection_rates(detector, takes),
            "confusable": {"phrases": CONFUSABLE[model], "woke": woken},
            "false_wakes": false_wakes(detector, audio, hours),
            "reset_ms": reset_ms(detector),
        }
        detector.close()
        print(f"[wake_eval] {model} done", file=sys.stderr)
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = []
    for model, r in result["models"].items():
        families = list(next(iter(r["detection"].values())).keys() - {"extra_detections", "min_peak", "peaks", "missed"})
        families.sort()
        lines.append(f"\n{model} (\"{r['wake_word']}\", threshold {r['threshold']})")
        lines.append("| condition | " + " | ".join(families) + " | extra detections | lowest peak |")
        lines.append("| --- " * (len(families) + 3) + "|")
        for condition, row in r["detection"].items():
            cells = [f"{row[f]['detected']}/{row[f]['total']}" for f in families]
            lines.append(f"| {condition} | " + " | ".join(cells) + f" | {row['extra_detections']} | {row['min_peak']} |")
        lines.append(f"missed when clean: {r['detection']['clean']['missed']}")
        fw = r["false_wakes"]
        lines.append(
            f"false wakes: {fw['false_wakes']} in {fw['hours_scanned']} h "
            f"({fw['unique_audio_s']} s of unique non-wake speech looped; first clean pass: "
            f"{fw['false_wakes_first_clean_pass']}) = {fw['false_wakes_per_hour']}/h"
        )
        lines.append(f"confusable phrases that woke it: {len(r['confusable']['woke'])}/"
                     f"{len(r['confusable']['phrases'])} {r['confusable']['woke']}")
        lines.append(f"CPU: {fw['cpu_ms_per_80ms']} ms per 80 ms of audio (20 ms frames), "
                     f"reset() {r['reset_ms']} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["okay_nabu", "hey_jarvis"], choices=available_models())
    parser.add_argument("--hours", type=float, default=1.0, help="non-wake audio to scan per model")
    parser.add_argument("--no-espeak", action="store_true", help="piper voices only")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    use_espeak = not args.no_espeak and shutil.which("espeak-ng") is not None
    if not use_espeak and not args.no_espeak:
        print("[wake_eval] espeak-ng not found: piper voices only", file=sys.stderr)
    result = evaluate(args.models, args.hours, use_espeak)
    result["espeak"] = use_espeak
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
