"""Scripted turn-taking scenarios in a simulated room, and their benchmark.

A scenario is a recording of the user (``audio_assets/scenarios``, built by
``make_scenarios.py`` from the committed speech): a question, then an
interruption, a cough, a thinking pause... It is played at real-time pace
into the full pipeline with the real models, as a microphone would capture
it. :class:`SimulatedRoom` is the loudspeaker and the microphone: reply
audio is placed on the input's timeline (:class:`TimelineOutput`) and, with
echo on, fed back into the microphone through :class:`audio.room.RoomEcho`
(delayed, attenuated, filtered like a room), then through the session's
echo canceller, exactly as ``mic`` mode runs on a kiosk.

``voice-assistant scenarios`` runs the set and prints, per scenario and
overall: barge-in stop times (onset of the interrupting speech to the last
reply sample), self-interruptions, false barge-ins and turn counts, against
the targets.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audio.files import read_wav
from audio.resample import Resampler
from pipeline.frames import AudioFrame, now
from pipeline.metrics import percentile
from pipeline.playback import TimelineOutput

from ..config import Config
from ..errors import InputError
from ..models import Models

SCENARIOS = Path(__file__).resolve().parents[2] / "audio_assets" / "scenarios"
# What the canceller heard before a scenario (EchoSettings.converged_s).
_GREETING = "Hello! I am your voice assistant. Ask me anything, and interrupt me whenever you like."


@dataclass
class EchoSettings:
    """How the simulated room feeds the speaker back into the microphone."""

    delay_ms: float = 60.0
    gain_db: float = -10.0
    rt60_ms: float = 200.0
    seed: int = 0
    cancel: bool = True  # run the session's echo canceller
    # Seconds of the assistant's voice the canceller has already heard in
    # this room before the scenario starts (a kiosk that has been running).
    # A fresh AEC3 ducks the near end during its first seconds of far-end
    # audio: measured on the committed speech, a user talking 0.3 s into the
    # first reply of the canceller's life is heard 280-360 ms late, against
    # 20 ms once it has heard one earlier reply. 0: a fresh canceller.
    converged_s: float = 3.0


class SimulatedRoom:
    """A loudspeaker and a microphone in one room, on the input's timeline.

    ``output`` is what the session plays into; :meth:`frames` yields the
    microphone: the user's recording at real-time pace plus, with echo on,
    what the speaker played, through the room. The canceller (if any) gets
    the speaker signal as its reference, stamped with when it played.
    """

    def __init__(self, pcm: np.ndarray, config: Config, echo: EchoSettings | None, canceller: Any = None) -> None:
        self.pcm = pcm
        self.rate = config.audio.input_rate
        self.frame_ms = config.audio.frame_ms
        self.output = TimelineOutput(config.audio.output_rate, self.rate, realtime=True)
        self.canceller = canceller
        self.room: Any = None
        if echo is not None:
            from audio.room import RoomEcho

            self.room = RoomEcho(
                sample_rate=self.rate, delay_ms=echo.delay_ms, gain_db=echo.gain_db, rt60_ms=echo.rt60_ms, seed=echo.seed
            )
        self._to_mic = Resampler(config.audio.output_rate, self.rate)
        self._out_fed = 0  # output-timeline samples already passed to the room
        self._mic_fed = 0  # the same, in microphone samples
        self.echo_energy = 0.0
        self.t0 = 0.0
        self._echo = echo

    def converge(self, voice: np.ndarray, before: float) -> None:
        """Let the canceller hear ``voice`` (the assistant's, at the mic rate)
        through this room, ending a second before ``before``: what a kiosk's
        canceller has adapted to by the time a user walks up. The room's
        impulse response is the same (same settings and seed); the session
        never sees these frames."""
        if self.canceller is None or self._echo is None or not len(voice):
            return
        from audio.room import RoomEcho

        e = self._echo
        room = RoomEcho(sample_rate=self.rate, delay_ms=e.delay_ms, gain_db=e.gain_db, rt60_ms=e.rt60_ms, seed=e.seed)
        size = self.rate * self.frame_ms // 1000
        frames = -(-len(voice) // size) + -(-int(0.3 * self.rate) // size)  # the voice, then its tail
        t0 = before - 1.0 - frames * size / self.rate
        played = np.zeros(frames * size, np.float64)
        played[: len(voice)] = voice
        room.play(played, self.rate, 0)
        rng = np.random.default_rng(e.seed)
        for i in range(frames):
            lo = i * size
            self.canceller.reference(played[lo : lo + size].astype(np.int16), self.rate, t0 + lo / self.rate)
            mic = np.asarray(room.echo(lo, size), dtype=np.float64) + rng.normal(0.0, 2.0, size)
            pcm = np.clip(mic, -32768, 32767).astype(np.int16)
            self.canceller.process(AudioFrame(pcm=pcm, sample_rate=self.rate, captured_at=t0 + (lo + size) / self.rate))

    def _play_until(self, mic_end: int) -> None:
        """Pass what the speaker played up to ``mic_end`` to the room and the canceller."""
        out_end = int(mic_end * self.output.sample_rate / self.rate)
        if out_end <= self._out_fed:
            return
        played = self.output.span(self._out_fed, out_end)
        self._out_fed = out_end
        pcm = self._to_mic.process(played)
        if not len(pcm):
            return
        at = self.t0 + self._mic_fed / self.rate
        if self.room is not None:
            self.room.play(pcm, self.rate, self._mic_fed)
        if self.canceller is not None:
            self.canceller.reference(pcm, self.rate, at)
        self._mic_fed += len(pcm)

    async def frames(self, start: float) -> AsyncIterator[AudioFrame]:
        """The microphone at real-time pace, stamped like a capture device."""
        self.t0 = start
        size = self.rate * self.frame_ms // 1000
        for offset in range(0, len(self.pcm), size):
            chunk = self.pcm[offset : offset + size]
            if len(chunk) < size:
                chunk = np.concatenate([chunk, np.zeros(size - len(chunk), np.int16)])
            due = start + (offset + size) / self.rate
            delay = due - now()
            if delay > 0:
                await asyncio.sleep(delay)
            self._play_until(offset + size)
            if self.room is not None:
                echo = np.asarray(self.room.echo(offset, size), dtype=np.float64)
                self.echo_energy += float(np.sum(echo * echo))
                chunk = np.clip(chunk.astype(np.float64) + echo, -32768, 32767).astype(np.int16)
            yield AudioFrame(pcm=chunk, sample_rate=self.rate, captured_at=due, position=offset)


@dataclass
class ScenarioResult:
    name: str
    echo: bool
    echo_delay_ms: float | None
    turns: list[dict[str, Any]]
    interruptions: list[dict[str, Any]]
    rejected_barge_ins: int
    expected: dict[str, Any] = field(default_factory=dict)
    verdicts: dict[str, bool] = field(default_factory=dict)
    session: Any = None  # for tests: history, events, stages (not serialized)
    room: SimulatedRoom | None = None
    events: list[Any] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.name,
            "echo": self.echo,
            "echo_delay_ms": self.echo_delay_ms,
            "expected": self.expected,
            "verdicts": self.verdicts,
            "interruptions": self.interruptions,
            "rejected_barge_in_onsets": self.rejected_barge_ins,
            "turns": self.turns,
        }


def load_scenarios(directory: Path = SCENARIOS) -> list[dict[str, Any]]:
    path = directory / "scenarios.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no scenario set at {directory} (expected scenarios.json)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    scenarios = data["scenarios"] if isinstance(data, dict) else data
    for s in scenarios:
        s["path"] = str(directory / s["file"])
    return scenarios


async def run_scenario(
    models: Models, config: Config, scenario: dict[str, Any], echo: EchoSettings | None
) -> ScenarioResult:
    """One scenario through the full pipeline in the simulated room."""
    from ..session import Session

    pcm, rate = read_wav(Path(scenario["path"]))
    if rate != config.audio.input_rate:
        raise InputError(f"{scenario['path']}: expected {config.audio.input_rate} Hz, got {rate}")
    canceller = None
    if echo is not None and echo.cancel:
        from audio.echo import EchoCanceller

        canceller = EchoCanceller(
            sample_rate=rate, frame_ms=config.audio.frame_ms, tail_ms=config.echo.tail_ms, delay_ms=config.echo.delay_ms
        )
    room = SimulatedRoom(pcm, config, echo, canceller)
    session = Session(models, config, room.output, echo_canceller=canceller)
    events: list[Any] = []
    session.bus.subscribe(events.append)
    start = now()
    if echo is not None and echo.converged_s > 0:
        greeting = models.phrase(_GREETING, rate)[: int(echo.converged_s * rate)]
        room.converge(greeting, before=start)
    await session.run(room.frames(start))
    origin = start
    interruptions = [
        {
            "turn": e.turn_id,
            "by_turn": e.by_turn,
            "onset_s": round(e.onset_at - origin, 3),
            "stop_ms": round(e.stop_ms, 1),
            "heard_text": e.heard_text,
            "played_s": round(e.played_samples / e.sample_rate, 3),
        }
        for e in session.controller.interruptions
    ]
    vad = session.pipeline.vad
    turns = session.report.to_json()
    for t in turns:  # on the scenario's own clock, to compare with its script
        t["speech_start_s"] = round(t["milestones_ms"].get("speech_start", math.nan) / 1000 + (session.origin - origin), 3)
    result = ScenarioResult(
        name=scenario["name"],
        echo=echo is not None,
        echo_delay_ms=echo.delay_ms if echo is not None else None,
        turns=turns,
        interruptions=interruptions,
        rejected_barge_ins=getattr(vad, "rejected_barge_ins", 0),
        expected={k: v for k, v in scenario.items() if k.startswith("expect")},
        session=session,
        room=room,
        events=events,
    )
    judge(scenario, result)
    return result


def judge(scenario: dict[str, Any], result: ScenarioResult) -> None:
    """Compare what happened with what the scenario's script expects."""
    onsets = [float(t) for t in scenario.get("interruption_onsets_s", [])]
    tolerance = 0.6
    real, spurious = [], []
    for i in result.interruptions:
        (real if any(abs(i["onset_s"] - o) <= tolerance for o in onsets) else spurious).append(i)
    v: dict[str, bool] = {}
    if "expect_interruptions" in scenario:
        v["interruptions"] = len(real) == int(scenario["expect_interruptions"])
    v["no_spurious_interruption"] = not spurious
    spoken = [t for t in result.turns if t["transcript"]]
    if "expect_turns" in scenario:
        v["turns"] = len(spoken) == int(scenario["expect_turns"])
    result.verdicts = v
    result.expected["spurious_interruptions"] = len(spurious)


async def run_set(
    models: Models, config: Config, scenarios: list[dict[str, Any]], echo_modes: list[bool], echoes: list[EchoSettings]
) -> list[ScenarioResult]:
    """Each scenario without echo, and with echo once per echo setting."""
    results = []
    for scenario in scenarios:
        for with_echo in echo_modes:
            if with_echo is False and scenario.get("echo_only"):
                continue
            for echo in echoes if with_echo else [None]:
                results.append(await run_scenario(models, config, scenario, echo))
    return results


def summarize(results: list[ScenarioResult]) -> dict[str, Any]:
    stops = [i["stop_ms"] for r in results for i in r.interruptions]
    spurious = sum(r.expected.get("spurious_interruptions", 0) for r in results)
    self_interruptions = sum(r.expected.get("spurious_interruptions", 0) for r in results if r.echo)
    cough_runs = [r for r in results if r.name.startswith(("cough", "bursts"))]
    return {
        "runs": len(results),
        "false_barge_ins_from_bursts": sum(len(r.interruptions) for r in cough_runs),
        "pause_scenarios_split": sum(
            1 for r in results if r.name.startswith("thinking_pause") and not r.verdicts.get("turns", True)
        ),
        "interruptions": len(stops),
        "barge_in_stop_ms": {
            "p50": percentile(stops, 50) if stops else None,
            "p95": percentile(stops, 95) if stops else None,
            "max": max(stops, default=None),
        },
        "spurious_interruptions": spurious,
        "self_interruptions_with_echo": self_interruptions,
        "failed_checks": [f"{r.name}{' (echo)' if r.echo else ''}: {k}" for r in results for k, ok in r.verdicts.items() if not ok],
    }


def format_table(results: list[ScenarioResult], summary: dict[str, Any]) -> str:
    lines = [f"{'scenario':24} {'echo':9} {'turns':>5} {'interrupts':>10} {'stop ms':>9}  checks"]
    for r in results:
        spoken = sum(1 for t in r.turns if t["transcript"])
        stops = ", ".join(f"{i['stop_ms']:.0f}" for i in r.interruptions) or "-"
        checks = " ".join(f"{k}:{'ok' if ok else 'FAIL'}" for k, ok in r.verdicts.items())
        echo = f"{r.echo_delay_ms:.0f} ms" if r.echo else "off"
        lines.append(f"{r.name:24} {echo:9} {spoken:>5} {len(r.interruptions):>10} {stops:>9}  {checks}")
    s = summary["barge_in_stop_ms"]
    fmt = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    lines += [
        "",
        f"barge-in stop (onset of user speech -> last reply sample): p50 {fmt(s['p50'])} ms, "
        f"p95 {fmt(s['p95'])} ms, max {fmt(s['max'])} ms over {summary['interruptions']} interruptions (target p95 <= 400)",
        f"self-interruptions with echo on: {summary['self_interruptions_with_echo']} (target 0)",
        f"spurious interruptions (any run): {summary['spurious_interruptions']} (target 0)",
        f"false barge-ins from coughs/knocks/blips: {summary['false_barge_ins_from_bursts']} (target 0)",
        f"thinking pauses split into two turns: {summary['pause_scenarios_split']} (target 0)",
        f"failed checks: {', '.join(summary['failed_checks']) or 'none'}",
    ]
    return "\n".join(lines)


def scenarios_command(args: Any, config: Config) -> int:
    """``voice-assistant scenarios``: run the set, print the table, write JSON."""
    import sys

    from ..models import load_models

    directory = Path(args.dir) if args.dir else SCENARIOS
    scenarios = load_scenarios(directory)
    if args.only:
        unknown = sorted(set(args.only) - {s["name"] for s in scenarios})
        if unknown:
            raise InputError(f"no such scenario: {', '.join(unknown)} (have: {', '.join(s['name'] for s in scenarios)})")
        scenarios = [s for s in scenarios if s["name"] in args.only]
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.echo]
    converged = 0.0 if args.fresh_canceller else EchoSettings.converged_s
    echoes = [
        EchoSettings(delay_ms=d, gain_db=args.echo_gain_db, cancel=not args.no_cancel, converged_s=converged)
        for d in args.echo_delay_ms
    ]
    print("loading models...", file=sys.stderr)
    models = load_models(config)

    async def go() -> list[ScenarioResult]:
        await models.warm_up()
        return await run_set(models, config, scenarios, modes, echoes)

    try:
        results = asyncio.run(go())
    finally:
        models.close()
    summary = summarize(results)
    print(format_table(results, summary))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"summary": summary, "echo": [vars(e) for e in echoes], "runs": [r.to_json() for r in results]}, indent=2),
            encoding="utf-8",
        )
    return 0 if not summary["failed_checks"] else 1
