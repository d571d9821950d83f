"""Echo cancellation, the simulated room, and the scripted scenario files.

Real signals throughout: the committed speech (piper questions stand for
the assistant's voice, espeak questions for the user talking over it), the
real WebRTC AEC3 from livekit, webrtcvad for "is the user still heard".
"""

from __future__ import annotations

import json
import math
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from audio.echo import EchoCanceller
from audio.frame import AudioFrame
from audio.resample import resample
from audio.room import RoomEcho

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "audio_assets"
RATE = 16000
FRAME = 320  # 20 ms
LAG = 128  # AEC3's output delay at 16 kHz (EchoCanceller.latency_ms)


def speech(name: str) -> np.ndarray:
    """A committed question, cut to its speech span, as float int16 units."""
    manifest = json.loads((ASSETS / "manifest.json").read_text())
    s, e = manifest["files"][f"questions/{name}.wav"]["speech_s"]
    with wave.open(str(ASSETS / "questions" / f"{name}.wav")) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    return pcm[int(s * RATE) : int(e * RATE)]


def assistant_voice() -> np.ndarray:
    """About 9 s of the assistant's (piper) voice with short pauses."""
    gap = np.zeros(int(0.4 * RATE))
    parts = [speech("capital_of_france"), gap, speech("moon_fact"), gap, speech("make_tea"), gap,
             speech("spider_legs"), gap]
    far = np.concatenate(parts)
    return np.concatenate([far, np.zeros((-len(far)) % FRAME)])


def dbfs(x: np.ndarray) -> float:
    return 20 * math.log10(max(1e-9, float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))) / 32768)


def cancel(
    mic: np.ndarray,
    far: np.ndarray,
    far_rate: int = RATE,
    t0: float = 5000.0,
    jitter_ms: float = 0.0,
    block_s: float = 0.02,
    ahead_s: float = 0.1,
) -> tuple[np.ndarray, EchoCanceller]:
    """Run mic frames through a canceller, handing it the speaker signal
    block by block ``ahead_s`` before it plays, stamped on the monotonic
    clock (starting at ``t0``) with optional jitter. Returns the output
    with AEC3's block delay taken out, and the canceller."""
    ec = EchoCanceller(sample_rate=RATE, frame_ms=20, tail_ms=200)
    rng = np.random.default_rng(5)
    ref = far if far_rate == RATE else resample(far, RATE, far_rate)
    block = int(block_s * far_rate)
    out = np.zeros(len(mic))
    fed = 0
    for i in range(0, len(mic), FRAME):
        while fed < len(ref) and fed / far_rate < (i + FRAME) / RATE + ahead_s:
            chunk = np.round(ref[fed : fed + block]).astype(np.int16)
            ec.reference(chunk, far_rate, t0 + fed / far_rate + rng.normal(0, jitter_ms / 1000))
            fed += block
        captured_at = t0 + (i + FRAME - 1) / RATE + rng.normal(0, jitter_ms / 1000)
        frame = AudioFrame(pcm=mic[i : i + FRAME].astype(np.int16), sample_rate=RATE, captured_at=captured_at, position=i)
        cleaned = ec.process(frame)
        assert len(cleaned.pcm) == FRAME and cleaned.captured_at == frame.captured_at
        assert cleaned.position == i and cleaned.pcm.dtype == np.int16
        out[i : i + FRAME] = cleaned.pcm
    return np.concatenate([out[LAG:], np.zeros(LAG)]), ec


def room_mic(far: np.ndarray, delay_ms: float, gain_db: float, near: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The microphone: the room's echo of ``far``, plus ``near``, plus a -80 dBFS floor."""
    room = RoomEcho(RATE, delay_ms=delay_ms, gain_db=gain_db, rt60_ms=200, seed=0)
    room.play(far, RATE, 0)
    echo = room.echo(0, len(far)).astype(np.float64)
    mic = echo + np.random.default_rng(1).normal(0, 3, len(far))
    if near is not None:
        mic += near
    return np.clip(np.round(mic), -32768, 32767), echo


def erle(echo: np.ndarray, out: np.ndarray, start_s: float, near: np.ndarray | None = None) -> float:
    """Echo energy over residual energy in frames with echo and no near-end, after ``start_s``."""
    frames = [slice(i, i + FRAME) for i in range(int(start_s * RATE), len(echo) - FRAME, FRAME)]
    keep = [f for f in frames if dbfs(echo[f]) > -60 and (near is None or not np.any(near[f]))]
    e = sum(float(np.sum(echo[f] ** 2)) for f in keep)
    r = sum(float(np.sum(out[f] ** 2)) for f in keep)
    return 10 * math.log10(e / max(r, 1e-9))


# --------------------------------------------------------------------------
# The room
# --------------------------------------------------------------------------


@pytest.mark.parametrize("delay_ms,gain_db", [(30, -6), (60, -10), (120, -20)])
def test_room_echo_has_the_intended_delay_and_level(delay_ms: int, gain_db: float) -> None:
    far = assistant_voice()
    room = RoomEcho(RATE, delay_ms=delay_ms, gain_db=gain_db, rt60_ms=200, seed=0)
    room.play(far, RATE, 0)
    echo = room.echo(0, len(far))
    n = 1 << int(math.ceil(math.log2(2 * len(far))))
    xcorr = np.fft.irfft(np.fft.rfft(echo, n) * np.conj(np.fft.rfft(far, n)), n)
    lag = int(np.argmax(xcorr[: RATE // 2]))
    assert abs(lag - delay_ms * RATE / 1000) <= RATE / 1000  # within 1 ms
    assert np.max(np.abs(echo[: int(delay_ms * RATE / 1000) - 1])) < 1e-3  # nothing before the direct path
    level = 10 * math.log10(float(np.sum(echo.astype(np.float64) ** 2)) / float(np.sum(far**2)))
    assert abs(level - gain_db) <= 1.5, level
    # The tail decays: 200 ms after the direct path the response is 30+ dB down.
    h = room.response
    d = int(delay_ms * RATE / 1000)
    early = float(np.sum(h[d : d + 800] ** 2))
    late = float(np.sum(h[d + 3200 :] ** 2))
    assert 10 * math.log10(early / late) > 30


def test_room_echo_is_deterministic_and_streams_like_a_whole() -> None:
    far = assistant_voice()[: 3 * RATE]
    a, b, c = (RoomEcho(RATE, 60, -10, 200, seed=s) for s in (4, 4, 5))
    np.testing.assert_array_equal(a.response, b.response)
    assert not np.allclose(a.response, c.response)
    a.play(far, RATE, 100)
    whole = a.echo(0, len(far) + 4000)
    # Frame by frame, the speaker signal placed in pieces (one ahead of time).
    b.play(far[:20000], RATE, 100)
    pieces = []
    for i in range(0, len(far) + 4000, FRAME):
        if i == 6400:
            b.play(far[20000:], RATE, 20100)
        pieces.append(b.echo(i, FRAME))
    np.testing.assert_allclose(np.concatenate(pieces)[: len(whole)], whole, atol=1e-3)
    # Another rate is resampled onto the mic timeline: the same echo, near enough.
    d = RoomEcho(RATE, 60, -10, 200, seed=4)
    d.play(resample(far, RATE, 22050), 22050, 100)
    other = d.echo(0, len(far) + 4000)
    assert 10 * math.log10(np.sum(whole**2) / np.sum((other - whole) ** 2)) > 30


# --------------------------------------------------------------------------
# The canceller
# --------------------------------------------------------------------------


@pytest.mark.parametrize("delay_ms", [30, 60, 120])
@pytest.mark.parametrize("gain_db", [-6, -14])
def test_canceller_removes_room_echo(delay_ms: int, gain_db: float) -> None:
    """Measured 48-57 dB after 2 s (33-50 dB in the first 2 s); residual
    frames at most -66 dBFS, far below the barge-in loudness floor."""
    far = assistant_voice()
    mic, echo = room_mic(far, delay_ms, gain_db)
    out, ec = cancel(mic, far)
    assert erle(echo, out, 0.0) >= 25
    assert erle(echo, out, 2.0) >= 35
    loudest = max(dbfs(out[i : i + FRAME]) for i in range(2 * RATE, len(out) - FRAME, FRAME))
    assert loudest < -55, loudest
    assert ec.erle_db is not None and ec.erle_db > 10  # the log metric sees it too
    assert ec.ms_per_frame < 10


@pytest.mark.parametrize("gain_db,min_heard", [(-10, 0.85), (-6, 0.75)])
def test_user_speech_over_the_echo_survives(gain_db: float, min_heard: float) -> None:
    """Double talk: the user (an espeak voice, -10 dBFS peak) talks over
    the assistant's echo (-10 dB: the user 4-8 dB above it; -6 dB: about as
    loud). After cancellation webrtcvad, run over each whole stream as the
    VAD stage runs it, still hears the user's voiced frames from (nearly)
    the onset, and the echo alone is (nearly) never speech.

    Measured: -10 dB: 100/112 and 73/73 frames heard, onset 60 / 0 ms late,
    level -5.1 / -1.6 dB; -6 dB: 91/112 and 72/73, onset 60 / 0 ms late,
    level -5.8 / -2.4 dB (AEC3's suppressor ducks the user where the echo is
    as loud)."""
    import webrtcvad

    far = assistant_voice()
    near = np.zeros(len(far))
    spans = []
    for name, at in (("largest_planet", 2.5), ("romeo_and_juliet", 6.0)):
        s = speech(name) * 0.5
        a = int(at * RATE)
        s = s[: len(far) - a]
        near[a : a + len(s)] = s
        spans.append((a, a + len(s)))
    mic, echo = room_mic(far, 60, gain_db, near)
    out, _ = cancel(mic, far)

    def voiced(x: np.ndarray) -> np.ndarray:
        vad = webrtcvad.Vad(2)
        pcm = np.round(x).astype(np.int16)
        return np.array([vad.is_speech(pcm[i : i + FRAME].tobytes(), RATE) for i in range(0, len(x) - FRAME + 1, FRAME)])

    v_near, v_out, v_mic = voiced(near), voiced(out), voiced(mic)
    level = np.array([dbfs(x) for x in near[: len(v_near) * FRAME].reshape(-1, FRAME)])
    for a, b in spans:
        user = [k for k in range(a // FRAME, b // FRAME) if v_near[k] and level[k] > -40]
        heard = v_out[user]
        assert heard.mean() >= min_heard, (int(heard.sum()), len(user))
        assert heard[:5].any() and heard[:15].sum() >= 10, heard[:15]  # onset within 100 ms: a barge-in is heard
        kept = 10 * math.log10(sum(np.sum(out[k * FRAME : (k + 1) * FRAME] ** 2) for k in user)
                               / sum(np.sum(near[k * FRAME : (k + 1) * FRAME] ** 2) for k in user))
        assert -8.0 <= kept <= 2.0, kept
    # Echo alone (no user within 300 ms before: webrtcvad's own hangover).
    echo_only = [k for k in range(RATE // FRAME, len(v_out))
                 if dbfs(echo[k * FRAME : (k + 1) * FRAME]) > -50 and not np.any(near[max(0, k - 15) * FRAME : (k + 1) * FRAME])]
    assert len(echo_only) > 40
    assert v_out[echo_only].mean() <= 0.05, int(v_out[echo_only].sum())
    assert v_mic[echo_only].mean() > 0.8  # the echo was speech before
    assert max(dbfs(out[k * FRAME : (k + 1) * FRAME]) for k in echo_only) < -50


def test_without_reference_the_microphone_passes_unchanged_in_level() -> None:
    near = np.concatenate([speech("largest_planet"), np.zeros(FRAME)])
    near = near[: len(near) // FRAME * FRAME]
    out, ec = cancel(near, np.zeros(0))
    assert abs(dbfs(out) - dbfs(near)) < 1.0
    assert ec.erle_db is None and not ec.echo_active


def test_reference_at_the_speaker_rate_with_jittery_stamps_is_aligned() -> None:
    """Live mode: 22.05 kHz speaker blocks of 20 ms handed 100 ms ahead,
    both streams' stamps jittering by 2 ms, at an arbitrary monotonic time."""
    far = assistant_voice()
    mic, echo = room_mic(far, 90, -8)
    out, _ = cancel(mic, far, far_rate=22050, t0=123456.789, jitter_ms=2.0)
    assert erle(echo, out, 2.0) >= 35


def test_reference_placed_by_stamps_across_a_gap() -> None:
    """Two replies 3 s apart, each handed over whole when synthesized: the
    second is placed by its stamp, not glued to the end of the first."""
    a, b = speech("moon_fact"), speech("make_tea")
    gap = 3 * RATE
    far = np.concatenate([a, np.zeros(gap), b])
    far = np.concatenate([far, np.zeros((-len(far)) % FRAME)])
    mic, echo = room_mic(far, 60, -8)
    ec = EchoCanceller(sample_rate=RATE)
    t0 = 77.0
    ec.reference(a.astype(np.int16), RATE, t0)
    out = np.zeros(len(mic))
    handed = False
    for i in range(0, len(mic), FRAME):
        if not handed and i >= len(a) + RATE:  # the second reply, synthesized 2 s ahead of its time
            ec.reference(b.astype(np.int16), RATE, t0 + (len(a) + gap) / RATE)
            handed = True
        frame = AudioFrame(pcm=mic[i : i + FRAME].astype(np.int16), sample_rate=RATE, captured_at=t0 + (i + FRAME - 1) / RATE)
        out[i : i + FRAME] = ec.process(frame).pcm
    out = np.concatenate([out[LAG:], np.zeros(LAG)])
    second = slice(len(a) + gap, len(far))
    assert erle(echo[second], out[second], 0.5) >= 35


def test_reset_drops_the_reference() -> None:
    """After a barge-in clear the dropped audio is no longer subtracted
    (it will not play); reset(after=t) keeps what played before t."""
    far = assistant_voice()[: 4 * RATE]
    mic, echo = room_mic(far, 60, -8)
    t0 = 10.0

    def run(drop_at: float | None) -> np.ndarray:
        ec = EchoCanceller(sample_rate=RATE)
        ec.reference(far.astype(np.int16), RATE, t0)
        if drop_at is not None:
            ec.reset(after=t0 + drop_at) if drop_at > 0 else ec.reset()
        out = np.zeros(len(mic))
        for i in range(0, len(mic), FRAME):
            frame = AudioFrame(pcm=mic[i : i + FRAME].astype(np.int16), sample_rate=RATE, captured_at=t0 + (i + FRAME - 1) / RATE)
            out[i : i + FRAME] = ec.process(frame).pcm
        return np.concatenate([out[LAG:], np.zeros(LAG)])

    kept = run(None)
    assert erle(echo, kept, 0.5) >= 30
    assert erle(echo, run(0), 0.5) < 6  # all of it dropped: the echo stays
    cut = run(2.0)  # dropped from 2 s on
    before, after = slice(0, int(1.9 * RATE)), slice(int(2.3 * RATE), len(far))
    assert erle(echo[before], cut[before], 0.5) >= erle(echo[before], kept[before], 0.5) - 3
    assert erle(echo[after], kept[after], 0.0) >= 30
    assert erle(echo[after], cut[after], 0.0) < 10


def test_canceller_validates_its_settings() -> None:
    with pytest.raises(ValueError):
        EchoCanceller(sample_rate=22050)
    with pytest.raises(ValueError):
        EchoCanceller(frame_ms=25)
    ec = EchoCanceller()
    with pytest.raises(ValueError):
        ec.process(AudioFrame(pcm=np.zeros(441, np.int16), sample_rate=22050, captured_at=1.0))


# --------------------------------------------------------------------------
# The scenario files
# --------------------------------------------------------------------------


def _load_scenarios() -> dict:
    return json.loads((ASSETS / "scenarios" / "scenarios.json").read_text())


def _read(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)


def test_scenario_files_match_their_description() -> None:
    doc = _load_scenarios()
    names = {s["name"] for s in doc["scenarios"]}
    assert {"interrupt_mid_reply", "interrupt_over_echo", "cough_during_reply", "bursts_during_reply",
            "bursts_only", "thinking_pause_600ms", "thinking_pause_800ms", "two_quick_turns"} <= names
    folder = ASSETS / "scenarios"
    assert sum(p.stat().st_size for p in folder.iterdir()) < 3_000_000
    for s in doc["scenarios"]:
        pcm = _read(folder / s["file"])
        assert abs(len(pcm) / RATE - s["duration_s"]) < 0.001, s["name"]
        assert isinstance(s["expect_turns"], int) and isinstance(s["interruption_onsets_s"], list)
        events = sorted(s["events"], key=lambda e: e["start_s"])
        assert sum(e["kind"] == "speech" for e in events) == s["expect_turns"] + (s["name"].startswith("thinking"))
        covered = np.zeros(len(pcm), bool)
        for e in events:
            a, b = int(e["start_s"] * RATE), int(e["end_s"] * RATE)
            assert 0 <= a < b <= len(pcm)
            covered[max(0, a - 160) : b + 160] = True
            peak = 20 * math.log10(np.max(np.abs(pcm[a:b])) / 32767)
            if e["kind"] in ("cough", "knock"):
                assert 0.1 <= e["end_s"] - e["start_s"] <= 0.2, e
                assert abs(peak - e["peak_dbfs"]) < 0.5, (s["name"], e)
            elif e["kind"] == "blip":
                assert abs(peak - e["peak_dbfs"]) < 1.5, (s["name"], e)
            else:
                assert dbfs(pcm[a:b]) > -35, (s["name"], e)
        assert dbfs(pcm[~covered]) < -75, s["name"]  # elsewhere only the noise floor
        for onset in s["interruption_onsets_s"]:
            assert any(abs(e["start_s"] - onset) < 1e-6 and e["kind"] == "speech" for e in events)
    by = {s["name"]: s for s in doc["scenarios"]}
    for name in ("interrupt_mid_reply", "interrupt_over_echo"):
        s = by[name]
        assert s["expect_interruptions"] == 1 and s["expect_turns"] == 2
        assert abs(s["interruption_onset_s"] - s["question_end_s"] - 2.5) < 0.002
    assert by["interrupt_over_echo"]["echo_only"] is True
    for name, pause in (("thinking_pause_600ms", 0.6), ("thinking_pause_800ms", 0.8)):
        first, second = [e for e in by[name]["events"] if e["kind"] == "speech"]
        assert abs(second["start_s"] - first["end_s"] - pause) < 0.002 and by[name]["expect_turns"] == 1
    quick = by["two_quick_turns"]
    assert quick["expect_turns"] == 2 and "expect_interruptions" not in quick
    for name in ("cough_during_reply", "bursts_during_reply", "bursts_only"):
        assert by[name]["expect_interruptions"] == 0 and by[name]["interruption_onsets_s"] == []


def test_scenario_bursts_and_speech_are_what_the_script_makes() -> None:
    """The committed files hold the script's own output: each cough and
    knock regenerates from its seed, each question from its committed file."""
    sys.path.insert(0, str(ASSETS))
    try:
        import make_scenarios as ms
    finally:
        sys.path.remove(str(ASSETS))
    doc = _load_scenarios()
    checked = 0
    for s in doc["scenarios"]:
        pcm = _read(ASSETS / "scenarios" / s["file"]) / 32767
        for e in s["events"]:
            a = int(round(e["start_s"] * RATE))
            if e["kind"] in ("cough", "knock"):
                made = (ms.cough if e["kind"] == "cough" else ms.knock)(e["seed"], e["peak_dbfs"])
            elif e["kind"] == "speech" and e.get("text") == "Who wrote Romeo and Juliet?":
                made = ms.question("romeo_and_juliet")[0] * 10 ** (e["gain_db"] / 20)
            else:
                continue
            assert np.max(np.abs(pcm[a : a + len(made)] - made)) < 12 / 32767, (s["name"], e)
            checked += 1
    assert checked >= 20
