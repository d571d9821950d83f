"""Should Smart Turn v3.2 help decide when the user has finished? Measured before trusting it.

Scores, with the bundled model (pipeline/turns/semantic.py), what the
pipeline would hand it at a pause: the utterance from its onset (with the
VAD's 300 ms pre-roll) to the last voiced frame plus a little of the silence
that follows (``--tails``, default 0.08 s (the pause the decode starts at),
0.2 and 0.3 s):

* **complete** turns: each committed question, to its end;
* **unfinished** turns: the thinking-pause scenarios at their pause ("I need
  some help with ..."), and each committed question cut at 60% of its
  speech (mid-phrase);

and how long one call takes here (wall clock, each thread count). A turn
"scored complete" is P >= ``--threshold``. Prints a table; ``--json OUT``
writes it. The words rule's verdict on the same turns is the transcript's
(pipeline/turns/endpointing.py), so only the model is measured here.

    .venv/bin/python scripts/smart_turn_eval.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "audio_assets"
RATE = 16000
PREROLL_S = 0.3


def segment(pcm: np.ndarray, start_s: float, end_s: float, tail_s: float) -> np.ndarray:
    a = max(0, int((start_s - PREROLL_S) * RATE))
    b = int((end_s + tail_s) * RATE)
    out = pcm[a:b].astype(np.float32) / 32768
    return np.pad(out, (0, max(0, b - a - len(out))))


def cases() -> list[tuple[str, str, np.ndarray, float, float]]:
    """(name, expected, pcm, speech start s, end s) for every case."""
    from audio.files import read_wav

    manifest = json.loads((ASSETS / "manifest.json").read_text())["files"]
    out = []
    for name, entry in sorted(manifest.items()):
        if not name.startswith("questions/"):
            continue
        pcm, rate = read_wav(ASSETS / name)
        assert rate == RATE
        start, end = entry["speech_s"]
        stem = Path(name).stem
        out.append((stem, "complete", pcm, start, end))
        out.append((f"{stem} @60%", "unfinished", pcm, start, start + 0.6 * (end - start)))
    scenarios = json.loads((ASSETS / "scenarios" / "scenarios.json").read_text())["scenarios"]
    for sc in scenarios:
        if sc["name"].startswith("thinking_pause"):
            pcm, rate = read_wav(ASSETS / "scenarios" / sc["file"])
            first = sc["events"][0]
            out.append((f"{sc['name']} (at the pause)", "unfinished", pcm, first["start_s"], sc["pause_start_s"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tails", type=float, nargs="+", default=[0.08, 0.2, 0.3], metavar="S")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 1 or any(t < 0 for t in args.tails) or any(n < 1 for n in args.threads):
        parser.error("--threshold in (0, 1), --tails >= 0, --threads >= 1")

    from assistant.errors import ModelError
    from assistant.models import smart_turn_files
    from pipeline.turns.semantic import SmartTurn

    try:
        files = smart_turn_files()
    except ModelError as exc:
        print(f"smart_turn_eval: {exc}", file=sys.stderr)
        return 1
    model = SmartTurn(*files, threads=max(args.threads))
    rows = []
    print("| case | expected | " + " | ".join(f"P @ +{t:g} s" for t in args.tails) + " |")
    print("|---|---|" + "---|" * len(args.tails))
    for name, expected, pcm, start, end in cases():
        scores = [model(segment(pcm, start, end, tail)) for tail in args.tails]
        rows.append({"case": name, "expected": expected, "scores": dict(zip(map(str, args.tails), scores))})
        print(f"| {name} | {expected} | " + " | ".join(f"{p:.2f}" for p in scores) + " |")
    summary: dict[str, object] = {}
    for i, tail in enumerate(args.tails):
        done = [r["scores"][str(tail)] for r in rows if r["expected"] == "complete"]
        open_ = [r["scores"][str(tail)] for r in rows if r["expected"] == "unfinished"]
        summary[f"+{tail:g} s"] = {
            "complete_scored_complete": f"{sum(p >= args.threshold for p in done)}/{len(done)}",
            "unfinished_scored_unfinished": f"{sum(p < args.threshold for p in open_)}/{len(open_)}",
        }
    cost = {}
    probe = segment(cases()[0][2], 0.4, 2.0, 0.2)
    for threads in args.threads:
        timed = SmartTurn(*files, threads=threads)
        timed(probe)
        wall = []
        for _ in range(10):
            started = time.perf_counter()
            timed(probe)
            wall.append((time.perf_counter() - started) * 1000)
        cost[f"{threads} thread(s)"] = {"median_ms": round(statistics.median(wall), 1), "max_ms": round(max(wall), 1)}
    print(json.dumps({"threshold": args.threshold, "agreement": summary, "cost_per_call": cost}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "agreement": summary, "cost_per_call": cost}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
