"""Soak the kiosk: the real `voice-assistant kiosk` for N minutes, through virtual audio.

Starts a private PulseAudio (tests/virtual_audio.py, the device the tests
use) and the real kiosk on it, as systemd would run it (its own process,
``/metrics`` and ``/healthz`` on a port). Then, again and again until the
time is up: the wake word and a committed question into the microphone,
the answer, and every ``--interrupt-every``-th time a second question
spoken over the answer (a barge-in when the answer is still playing); then
silence until the kiosk has gone back to sleep.

Every minute it records, from outside the kiosk: RSS (the kiosk's own and
with its children, the vLLM engine core), open file descriptors, OS
threads, live asyncio tasks (the kiosk's ``/metrics``) and the
voice-to-voice of the turns that minute (the kiosk's one log line per
turn). At the end it prints the table and the verdict, measured after
``--warmup-minutes``: growth of each resource, turns lost (questions
asked whose turn never closed), wake words missed, and p95 voice-to-voice
of the last third against the first third.

    .venv/bin/python scripts/soak.py --minutes 60 --json soak.json

Exit status: 0 when the kiosk ran to the end, stopped cleanly and lost no
turn; 1 otherwise (the verdict says why); 2 for bad arguments. Resource
growth is reported, not judged: a few MB of allocator noise is not a leak,
and the table shows which it is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from assistant.telemetry import parse, total  # noqa: E402
from helpers import free_port  # noqa: E402

QUESTIONS = ROOT / "audio_assets" / "questions"
TURN_LINE = re.compile(r"turn (\d+) (completed|interrupted|cancelled): voice-to-voice (\d+|-)")
RATE = 16000


@dataclass
class Sample:
    """One minute of the soak, measured at its end."""

    minute: int
    rss_mb: float  # the kiosk process
    rss_total_mb: float  # with its children (the vLLM engine core)
    fds: int
    threads: int
    asyncio_tasks: int
    turns: int  # closed in this minute
    v2v_p50_ms: float | None
    v2v_p95_ms: float | None


@dataclass
class Tally:
    questions: int = 0  # questions spoken (each should close one turn)
    wake_words: int = 0
    wakes_missed: int = 0
    interruptions_tried: int = 0
    turns_lost: int = 0
    v2v: list[tuple[float, float]] = field(default_factory=list)  # (when, ms)
    statuses: dict[str, int] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def metric(text: str, name: str, **labels: str) -> float:
    return total(parse(text), name, **labels)


class Kiosk:
    """The kiosk process: start, read its log, scrape it, stop it."""

    def __init__(self, env: dict[str, str], port: int, sets: list[str], minutes: float) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        limit = int(minutes * 60 + 900)  # its own stop, should this script die
        command = [sys.executable, "-m", "assistant", "kiosk", "--max-seconds", str(limit),
                   "--set", f"kiosk.metrics_port={port}"]
        for item in sets:
            command += ["--set", item]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)
        self.lines: list[str] = []
        self.turns: list[tuple[float, str, float | None]] = []  # (when, status, v2v ms)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if match := TURN_LINE.search(line):
                v2v = None if match[3] == "-" else float(match[3])
                self.turns.append((time.monotonic(), match[2], v2v))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, timeout=10)

    def metrics(self) -> str:
        return self.get("/metrics").text

    def health(self) -> dict[str, Any]:
        return self.get("/healthz").json()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError("the kiosk exited while starting:\n" + "".join(self.lines[-40:]))
            try:
                if self.health()["ready"]:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError(f"the kiosk was not ready in {timeout:.0f} s")

    def resources(self) -> tuple[float, float, int, int]:
        """RSS (own, with children) in MB, open fds, OS threads."""
        own = self.ps.memory_info().rss
        children = 0
        for child in self.ps.children(recursive=True):
            try:
                children += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return own / 2**20, (own + children) / 2**20, self.ps.num_fds(), self.ps.num_threads()

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(timeout=10)
        return self.proc.returncode


def wait_for(condition: Any, timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(step)
    return False


def answered(kiosk: Kiosk) -> int:
    return sum(1 for _, status, _ in kiosk.turns if status in ("completed", "interrupted"))


def prepare_audio(workdir: Path, wake_word: str) -> tuple[list[Path], list[Path]]:
    """The questions alone, and each after the wake word (piper's voice)."""
    from assistant.config import load_config
    from assistant.models import load_piper
    from audio.files import read_wav, write_wav
    from wake_eval import speak_piper

    voice = load_piper(load_config())
    wake = speak_piper(voice, wake_word.replace("_", " ").title() + ".")
    plain, woken = [], []
    for wav in sorted(QUESTIONS.glob("*.wav")):
        pcm, rate = read_wav(wav)
        assert rate == RATE, wav
        path = workdir / f"wake_{wav.name}"
        write_wav(path, np.concatenate([wake, np.zeros(int(0.8 * RATE), np.int16), pcm]), RATE)
        plain.append(wav)
        woken.append(path)
    return plain, woken


def cycle(i: int, va: Any, kiosk: Kiosk, plain: list[Path], woken: list[Path], tally: Tally,
          interrupt: bool, wake_word: bool, idle_s: float) -> None:
    """Wake word and a question (and maybe a second over the answer); then back to sleep."""
    n = len(plain)
    before = answered(kiosk)
    wakes = metric(kiosk.metrics(), "voice_assistant_wake_detections_total")
    va.play_into_mic(woken[i % n] if wake_word else plain[i % n], lead_silence_s=0.3, trail_silence_s=0.3)
    tally.questions += 1
    tally.wake_words += wake_word
    va.wait_mic()
    expected = 1
    if interrupt:
        # Into the answer: the mean voice-to-voice so far, then a second in.
        recent = [ms for _, ms in tally.v2v[-10:]] or [2500.0]
        time.sleep(statistics.mean(recent) / 1000 + 1.0)
        va.play_into_mic(plain[(i + 1) % n], lead_silence_s=0.0, trail_silence_s=0.3)
        tally.questions += 1
        tally.interruptions_tried += 1
        expected = 2
        va.wait_mic()
    if wake_word and metric(kiosk.metrics(), "voice_assistant_wake_detections_total") <= wakes:
        tally.wakes_missed += 1
        # Nothing was heard: nothing is owed but the wake word itself.
        tally.questions -= expected
        return
    if not wait_for(lambda: answered(kiosk) >= before + expected, 120):
        tally.turns_lost += before + expected - answered(kiosk)
    if wake_word and not wait_for(lambda: not kiosk.health()["awake"], idle_s + 60):
        print(f"  cycle {i}: the kiosk did not go back to sleep", flush=True)
    elif not wake_word:
        time.sleep(idle_s)


def sampler(kiosk: Kiosk, start: float, samples: list[Sample], stop: threading.Event) -> None:
    minute = 0
    while not stop.wait(max(0.0, start + 60 * (minute + 1) - time.monotonic())):
        minute += 1
        if not kiosk.alive():
            return
        try:
            rss, total, fds, threads = kiosk.resources()
            tasks = int(metric(kiosk.metrics(), "voice_assistant_asyncio_tasks"))
        except (psutil.Error, httpx.HTTPError) as exc:
            print(f"  minute {minute}: could not sample ({exc})", flush=True)
            continue
        lo, hi = start + 60 * (minute - 1), start + 60 * minute
        v2v = [ms for when, _, ms in kiosk.turns if lo <= when < hi and ms is not None]
        closed = sum(1 for when, _, _ in kiosk.turns if lo <= when < hi)
        sample = Sample(minute, round(rss, 1), round(total, 1), fds, threads, tasks, closed,
                        percentile(v2v, 50), percentile(v2v, 95))
        samples.append(sample)
        print(row(sample), flush=True)


HEADER = "| min | RSS MB | RSS+children MB | fds | threads | tasks | turns | v2v p50 ms | v2v p95 ms |"


def row(s: Sample) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return (f"| {s.minute} | {s.rss_mb:.0f} | {s.rss_total_mb:.0f} | {s.fds} | {s.threads} | {s.asyncio_tasks} "
            f"| {s.turns} | {ms(s.v2v_p50_ms)} | {ms(s.v2v_p95_ms)} |")


def verdict(samples: list[Sample], tally: Tally, warmup: float, start: float) -> dict[str, Any]:
    after = [s for s in samples if s.minute > warmup] or samples[-1:]
    out: dict[str, Any] = {"warmup_minutes": warmup}
    if after:
        first, last = after[0], after[-1]
        hours = max(1e-9, (last.minute - first.minute) / 60)
        out["growth_after_warmup"] = {
            "rss_mb": round(last.rss_mb - first.rss_mb, 1),
            "rss_total_mb": round(last.rss_total_mb - first.rss_total_mb, 1),
            "rss_mb_per_hour_fit": round(float(np.polyfit([s.minute for s in after], [s.rss_mb for s in after], 1)[0])
                                         * 60, 1) if len(after) > 2 else None,
            "fds": last.fds - first.fds,
            "threads": last.threads - first.threads,
            "asyncio_tasks": last.asyncio_tasks - first.asyncio_tasks,
            "minutes": last.minute - first.minute,
            "hours": round(hours, 2),
        }
        lo = start + 60 * after[0].minute
        hi = start + 60 * after[-1].minute
        third = (hi - lo) / 3
        first_v = [ms for when, ms in tally.v2v if lo - 60 <= when < lo + third]
        last_v = [ms for when, ms in tally.v2v if hi - third <= when <= hi]
        p_first, p_last = percentile(first_v, 95), percentile(last_v, 95)
        out["v2v_p95_first_third_ms"] = p_first
        out["v2v_p95_last_third_ms"] = p_last
        out["v2v_p95_change_pct"] = (round(100 * (p_last - p_first) / p_first, 1)
                                     if p_first and p_last is not None else None)
    all_v = [ms for _, ms in tally.v2v]
    out["v2v_p50_ms"], out["v2v_p95_ms"] = percentile(all_v, 50), percentile(all_v, 95)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="how long to soak")
    parser.add_argument("--warmup-minutes", type=float, default=None,
                        help="minutes left out of the growth figures (default: 5, or a third of a short run)")
    parser.add_argument("--interrupt-every", type=int, default=4, metavar="N",
                        help="every Nth cycle speaks a second question over the answer (0: never)")
    parser.add_argument("--idle-s", type=float, default=4.0, help="the kiosk's kiosk.idle_s for the soak")
    parser.add_argument("--no-wake-word", action="store_true", help="kiosk.wake_word=none (always listening)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to the kiosk")
    parser.add_argument("--json", metavar="OUT", help="write the samples and the verdict")
    parser.add_argument("--workdir", metavar="DIR", help="keep the audio and the kiosk's log here")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.idle_s <= 0 or args.interrupt_every < 0:
        parser.error("--minutes and --idle-s must be > 0, --interrupt-every >= 0")
    warmup = args.warmup_minutes if args.warmup_minutes is not None else min(5.0, args.minutes / 3)

    from virtual_audio import VirtualAudio, unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"soak: virtual audio unavailable: {reason}", file=sys.stderr)
        return 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    wake_word = "none" if args.no_wake_word else "okay_nabu"
    plain, woken = prepare_audio(workdir, "okay_nabu")
    sets = [f"kiosk.idle_s={args.idle_s}", f"kiosk.wake_word={wake_word}", *args.set]
    tally = Tally()
    samples: list[Sample] = []
    with VirtualAudio(workdir / "pulse") as va:
        env = {**os.environ, **va.env}
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(key, None)
        kiosk = Kiosk(env, free_port(), sets, args.minutes)
        stop = threading.Event()
        try:
            started = time.monotonic()
            try:
                kiosk.wait_ready(600)
            except RuntimeError as exc:
                print(f"soak: {exc}", file=sys.stderr)
                return 1
            print(f"kiosk ready in {time.monotonic() - started:.0f} s; soaking {args.minutes:g} min", flush=True)
            time.sleep(5)  # the greeting plays out
            print(HEADER + "\n|---|---|---|---|---|---|---|---|---|", flush=True)
            start = time.monotonic()
            thread = threading.Thread(target=sampler, args=(kiosk, start, samples, stop), daemon=True)
            thread.start()
            i = 0
            while time.monotonic() < start + args.minutes * 60 and kiosk.alive():
                seen = len(kiosk.turns)
                interrupt = bool(args.interrupt_every) and i % args.interrupt_every == args.interrupt_every - 1
                cycle(i, va, kiosk, plain, woken, tally, interrupt, not args.no_wake_word, args.idle_s)
                tally.v2v += [(when, ms) for when, _, ms in kiosk.turns[seen:] if ms is not None]
                i += 1
            # The last minute's sample, then stop.
            thread.join(timeout=max(0.0, start + 60 * (int(args.minutes) + 0.2) - time.monotonic()) + 30)
            alive = kiosk.alive()
        finally:
            stop.set()
            rc_kiosk = kiosk.stop()
            (workdir / "kiosk.log").write_text("".join(kiosk.lines))
    for _, status, _ in kiosk.turns:
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
    result = verdict(samples, tally, warmup, start)
    traceback = any("Traceback" in line for line in kiosk.lines)
    result.update(
        kiosk_alive_to_the_end=alive, kiosk_exit=rc_kiosk, traceback_in_log=traceback,
        questions=tally.questions, turns_lost=tally.turns_lost, wake_words=tally.wake_words,
        wakes_missed=tally.wakes_missed, interruptions_tried=tally.interruptions_tried,
        turn_statuses=tally.statuses, cycles=i,
    )
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": [asdict(s) for s in samples], "verdict": result,
                                               "args": vars(args)}, indent=2))
    ok = alive and rc_kiosk == 0 and not traceback and tally.turns_lost == 0
    if not ok:
        print("soak: FAILED (see the verdict; the kiosk's log is in " + str(workdir / "kiosk.log") + ")",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
