#!/usr/bin/env python3
"""Build the scripted turn-taking scenarios under ``audio_assets/scenarios/``.

Usage (from the repository root)::

    .venv/bin/python audio_assets/make_scenarios.py             # build + Whisper-check the new phrases
    .venv/bin/python audio_assets/make_scenarios.py --no-verify # build only

Each scenario is what the *user's* microphone hears, on one timeline
(16 kHz mono PCM16, seeded noise floor of about 2 LSB RMS): the assistant's
replies are not in the files; a benchmark plays them into the room
(``audio.room.RoomEcho``) while the file runs. ``scenarios.json`` says
what happens when (seconds from the start of the file) and what the
pipeline must do: ``expect_turns`` (user turns with a transcript),
``expect_interruptions`` (barge-ins of a reply; absent where either count
is right), ``interruption_onsets_s`` (where an interruption may start; any
other one is a self-interruption or a false barge-in) and ``echo_only``
(only meaningful with the room echo on).

Speech comes from the committed questions (``questions/*.wav``, cut at
their ``speech_s`` span in ``manifest.json``); the thinking-pause phrases,
which no committed file holds, are spoken by piper's ``joe`` voice with the
seeded model of ``make_assets.py`` and checked with Whisper. Coughs, knocks
and clicks are synthesized here from seeded noise:

* cough: broadband noise through three vocal-tract-like resonances (F1 400-
  800 Hz, F2 1.2-1.9 kHz, F3 2.3-3 kHz), a 3-8 ms attack and a 25-60 ms
  decay, 100-200 ms long (some with a second, weaker burst);
* knock: two to four damped low resonances (80-450 Hz, 10-40 ms decay)
  struck by a 1-2 ms click, 100-200 ms long;
* blip: a -50 dBFS click and a -50 dBFS 40 ms tone, below anything that
  should count.

Determinism: numpy generators with fixed seeds, piper seeded as in
``make_assets.py``, sox without dither; WAV headers carry no date.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_assets as ma  # noqa: E402  (the seeded piper, sox, WAV helpers)

RATE = 16000
OUT = HERE / "scenarios"
LEAD_S = 0.5
NOISE_LSB = 2.0
NOISE_SEED = 7


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


def question(name: str) -> tuple[np.ndarray, str]:
    """The speech of a committed question (its ``speech_s`` span, float)."""
    manifest = json.loads((HERE / "manifest.json").read_text())
    entry = manifest["files"][f"questions/{name}.wav"]
    audio, rate = ma.read_wav(HERE / "questions" / f"{name}.wav")
    assert rate == RATE
    s, e = entry["speech_s"]
    return audio[int(s * RATE) : int(math.ceil(e * RATE))].copy(), entry["text"]


def piper_phrases(texts: list[str], verify: bool) -> list[np.ndarray]:
    """Phrases no committed file holds, spoken by the seeded piper voice."""
    piper = ma.Piper()
    verifier = ma.Verifier() if verify else None
    out = []
    for text in texts:
        take = ma.Take(text, "piper", "joe", {"length_scale": 1.0, "noise_scale": 0.667, "noise_w_scale": 0.8})
        raw, rate = piper.synth(take)
        speech = ma.trim(ma.sox_resample(raw, rate, RATE), RATE)
        speech = speech * (ma.PEAK / float(np.max(np.abs(speech))))
        if verifier is not None:
            pad = np.zeros(int(0.3 * RATE), np.float32)
            ok, got = verifier.matches(np.concatenate([pad, speech, pad]), text)
            if not ok:
                raise SystemExit(f"error: piper's {text!r} was transcribed as {got}")
        out.append(speech.astype(np.float32))
    return out


def _resonator(x: np.ndarray, freq: float, bw: float) -> np.ndarray:
    """Two-pole resonance at ``freq`` Hz with bandwidth ``bw`` Hz."""
    r = math.exp(-math.pi * bw / RATE)
    a1, a2 = -2 * r * math.cos(2 * math.pi * freq / RATE), r * r
    y = np.zeros(len(x))
    y1 = y2 = 0.0
    gain = 1 - r
    for i, xi in enumerate(x):
        yi = gain * xi - a1 * y1 - a2 * y2
        y2, y1 = y1, yi
        y[i] = yi
    return y


def _at_peak(x: np.ndarray, peak_dbfs: float) -> np.ndarray:
    return x * (10 ** (peak_dbfs / 20) / float(np.max(np.abs(x))))


def cough(seed: int, peak_dbfs: float) -> np.ndarray:
    """A 100-200 ms cough: shaped noise through vocal-tract resonances."""
    rng = np.random.default_rng(seed)
    dur = rng.uniform(0.10, 0.20)
    n = int(dur * RATE)
    noise = rng.standard_normal(n)
    formants = [(rng.uniform(400, 800), 150), (rng.uniform(1200, 1900), 250), (rng.uniform(2300, 3000), 350)]
    voiced = sum(w * _resonator(noise, f, bw) for w, (f, bw) in zip((1.0, 0.6, 0.35), formants))
    x = voiced / np.max(np.abs(voiced)) + 0.25 * noise / np.max(np.abs(noise))
    t = np.arange(n) / RATE
    attack = rng.uniform(0.003, 0.008)
    env = np.minimum(1.0, t / attack) * np.exp(-np.maximum(0.0, t - attack) / rng.uniform(0.025, 0.060))
    if rng.random() < 0.5:  # a second, weaker expulsion
        t2 = rng.uniform(0.05, dur - 0.04)
        env += 0.5 * (t >= t2) * np.exp(-np.maximum(0.0, t - t2) / 0.02)
    env *= np.minimum(1.0, (n - np.arange(n)) / (0.005 * RATE))  # no click at the end
    return _at_peak(x * env, peak_dbfs)


def knock(seed: int, peak_dbfs: float) -> np.ndarray:
    """A 100-200 ms knock on wood: a few damped low resonances."""
    rng = np.random.default_rng(seed)
    n = int(rng.uniform(0.10, 0.20) * RATE)
    t = np.arange(n) / RATE
    x = np.zeros(n)
    for _ in range(rng.integers(2, 5)):
        f, tau = rng.uniform(80, 450), rng.uniform(0.010, 0.040)
        x += rng.uniform(0.4, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * np.exp(-t / tau)
    click = int(rng.uniform(0.001, 0.002) * RATE)
    x[:click] += rng.standard_normal(click) * 0.8
    x *= np.minimum(1.0, (n - np.arange(n)) / (0.005 * RATE))
    return _at_peak(x, peak_dbfs)


def blip(kind: str) -> np.ndarray:
    """Sub-threshold sounds at -50 dBFS peak: a click, a 40 ms tone."""
    if kind == "click":
        x = np.zeros(int(0.005 * RATE))
        x[0], x[1] = 1.0, -0.6
    else:
        t = np.arange(int(0.04 * RATE)) / RATE
        x = np.sin(2 * np.pi * 1000 * t) * np.hanning(len(t))
    return _at_peak(x, -50.0)


# --------------------------------------------------------------------------
# Scenario timeline
# --------------------------------------------------------------------------


@dataclass
class Scene:
    """One scenario being laid out: sounds placed on a timeline."""

    name: str
    description: str
    parts: list[tuple[float, np.ndarray]] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    cursor: float = LEAD_S

    def put(self, audio: np.ndarray, at: float, **event: object) -> tuple[float, float]:
        start = round(at, 3)
        self.parts.append((start, audio))
        end = round(start + len(audio) / RATE, 3)
        self.events.append({"start_s": start, "end_s": end, **event})
        self.cursor = end
        return start, end

    def render(self, tail_s: float) -> np.ndarray:
        total = int(math.ceil((self.cursor + tail_s) * RATE))
        out = np.zeros(total)
        for at, audio in self.parts:
            i = int(round(at * RATE))
            out[i : i + len(audio)] += audio
        rng = np.random.default_rng(NOISE_SEED)
        noise = np.clip(np.round(rng.normal(0.0, NOISE_LSB, total)), -8, 8) / 32767.0
        return out + noise


def speech(scene: Scene, audio: np.ndarray, text: str, at: float, gain_db: float = 0.0) -> tuple[float, float]:
    return scene.put(audio * 10 ** (gain_db / 20), at, kind="speech", text=text, gain_db=gain_db)


def burst(scene: Scene, kind: str, seed: int, peak_dbfs: float, at: float) -> tuple[float, float]:
    audio = cough(seed, peak_dbfs) if kind == "cough" else knock(seed, peak_dbfs)
    return scene.put(audio, at, kind=kind, seed=seed, peak_dbfs=peak_dbfs)


def build(verify: bool) -> list[tuple[Scene, dict, float]]:
    """Every scenario: (scene, its extra json keys, trailing silence)."""
    capital, capital_t = question("capital_of_france")
    spider, spider_t = question("spider_legs")
    moon, moon_t = question("moon_fact")
    tea, tea_t = question("make_tea")
    planet, planet_t = question("largest_planet")
    romeo, romeo_t = question("romeo_and_juliet")
    sun, sun_t = question("how_far_sun")
    help_with, homework = piper_phrases(["I need some help with", "my homework."], verify)
    scenes: list[tuple[Scene, dict, float]] = []

    # (a) An interruption while the reply plays (voice-to-voice ~1 s, replies
    # last several seconds: 2.5 s after the question, the reply is playing).
    s = Scene("interrupt_mid_reply", "A question; 2.5 s after it ends (the reply is playing) the user asks "
              "something else; then silence while the second answer plays.")
    _, q_end = speech(s, capital, capital_t, LEAD_S)
    onset, _ = speech(s, planet, planet_t, q_end + 2.5)
    scenes.append((s, {"question_end_s": q_end, "interruption_onset_s": onset, "interruption_onsets_s": [onset],
                       "expect_turns": 2, "expect_interruptions": 1}, 6.0))

    # (b) The same over the assistant's own echo; the interruption 6 dB
    # quieter than the question, so it competes with the echo.
    s = Scene("interrupt_over_echo", "As interrupt_mid_reply, meant for the room echo on: the assistant's voice "
              "comes back into the microphone and the user talks over it, 6 dB quieter than the question.")
    _, q_end = speech(s, sun, sun_t, LEAD_S)
    onset, _ = speech(s, romeo, romeo_t, q_end + 2.5, gain_db=-6.0)
    scenes.append((s, {"question_end_s": q_end, "interruption_onset_s": onset, "interruption_onsets_s": [onset],
                       "expect_turns": 2, "expect_interruptions": 1, "echo_only": True}, 6.0))

    # (c) A cough, a knock and a click while the reply plays.
    s = Scene("cough_during_reply", "A question, then a cough, a knock, another cough (100-200 ms each, "
              "-20 to -10 dBFS peak) and a -50 dBFS click while the reply plays; none may interrupt it.")
    _, q_end = speech(s, moon, moon_t, LEAD_S)
    c1, c1_end = burst(s, "cough", 11, -12.0, q_end + 2.0)
    burst(s, "knock", 21, -10.0, q_end + 3.0)
    burst(s, "cough", 12, -16.0, q_end + 4.0)
    s.put(blip("click"), q_end + 5.0, kind="blip", peak_dbfs=-50.0)
    scenes.append((s, {"question_end_s": q_end, "cough_onset_s": c1, "cough_duration_s": round(c1_end - c1, 3),
                       "interruption_onsets_s": [], "expect_turns": 1, "expect_interruptions": 0}, 4.0))

    # (c') The false-barge-in set over a reply: eight bursts, seeds and levels varied.
    s = Scene("bursts_during_reply", "A question, then eight coughs and knocks (different seeds, -20 to -10 "
              "dBFS peak) 0.8 s apart and two -50 dBFS blips while the reply plays; none may interrupt it.")
    _, q_end = speech(s, tea, tea_t, LEAD_S)
    at = q_end + 1.8
    for i, (kind, peak) in enumerate([("cough", -10.0), ("knock", -12.0), ("cough", -20.0), ("knock", -16.0),
                                      ("cough", -14.0), ("knock", -10.0), ("cough", -18.0), ("knock", -20.0)]):
        burst(s, kind, 100 + i, peak, at)
        at += 0.8
    s.put(blip("click"), at, kind="blip", peak_dbfs=-50.0)
    s.put(blip("tone"), at + 0.5, kind="blip", peak_dbfs=-50.0)
    scenes.append((s, {"question_end_s": q_end, "interruption_onsets_s": [], "expect_turns": 1,
                       "expect_interruptions": 0}, 4.0))

    # (c'') The same kind of sounds with no question: no turn may open.
    s = Scene("bursts_only", "Eight coughs and knocks (seeds and levels varied) and two -50 dBFS blips, "
              "1 s apart, no speech: no turn may open.")
    at = LEAD_S
    for i, (kind, peak) in enumerate([("knock", -10.0), ("cough", -12.0), ("knock", -14.0), ("cough", -16.0),
                                      ("knock", -18.0), ("cough", -20.0), ("knock", -12.0), ("cough", -10.0)]):
        burst(s, kind, 200 + i, peak, at)
        at += 1.0
    s.put(blip("click"), at, kind="blip", peak_dbfs=-50.0)
    s.put(blip("tone"), at + 0.5, kind="blip", peak_dbfs=-50.0)
    scenes.append((s, {"interruption_onsets_s": [], "expect_turns": 0, "expect_interruptions": 0}, 1.0))

    # (d) A thinking pause after an unfinished phrase: one turn, not two.
    for pause in (0.6, 0.8):
        s = Scene(f"thinking_pause_{int(pause * 1000)}ms", f'"I need some help with", {pause * 1000:.0f} ms '
                  'of silence, "my homework.": one turn (the endpoint rule waits after a trailing "with").')
        _, p_start = speech(s, help_with, "I need some help with", LEAD_S)
        speech(s, homework, "my homework.", p_start + pause)
        scenes.append((s, {"pause_start_s": p_start, "pause_s": pause, "interruption_onsets_s": [],
                           "expect_turns": 1, "expect_interruptions": 0}, 4.0))

    # (e) Two quick turns: a second question 0.9 s after the first ends.
    s = Scene("two_quick_turns", "Two complete questions, the second starting 0.9 s after the first ends: "
              "longer than the silence that ends a complete question (300-480 ms), so two turns, but about "
              "when the first reply starts (voice-to-voice ~1 s). Expected: two user turns, each transcribed "
              "on its own, the second answered; the first reply may be superseded, or interrupted at the "
              "second question's onset (timing-dependent, so not counted), never elsewhere.")
    _, q_end = speech(s, capital, capital_t, LEAD_S)
    onset, _ = speech(s, spider, spider_t, q_end + 0.9)
    scenes.append((s, {"question_end_s": q_end, "second_onset_s": onset, "gap_s": 0.9,
                       "interruption_onsets_s": [onset], "expect_turns": 2}, 6.0))
    return scenes


def generate(verify: bool) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.wav"):
        old.unlink()
    entries = []
    for scene, extra, tail in build(verify):
        audio = scene.render(tail)
        path = OUT / f"{scene.name}.wav"
        ma.write_wav(path, ma.to_int16(audio))
        entries.append({"name": scene.name, "file": path.name, "description": scene.description,
                        "duration_s": round(len(audio) / RATE, 3), **extra, "events": scene.events})
        print(f"scenarios/{path.name}  {len(audio) / RATE:.1f} s")
    doc = {"rate": RATE, "noise_rms_lsb": NOISE_LSB, "lead_silence_s": LEAD_S,
           "sources": "audio_assets/questions (manifest.json speech_s spans); thinking-pause phrases by piper joe "
                      "(seeded, as make_assets.py); coughs, knocks and blips synthesized here from seeded noise",
           "scenarios": entries}
    (OUT / "scenarios.json").write_text(json.dumps(doc, indent=2) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir() if p.is_file())
    print(f"total size of audio_assets/scenarios/: {total / 1e6:.2f} MB")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-verify", action="store_true", help="skip the Whisper check of the piper phrases")
    args = ap.parse_args()
    return generate(verify=not args.no_verify)


if __name__ == "__main__":
    sys.exit(main())
