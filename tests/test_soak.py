"""A short soak of the real kiosk (scripts/soak.py): the long one is run by hand.

Two minutes of wake word, question, answer and a barge-in through virtual
audio. What must hold for any honest run: the kiosk runs to the end and
stops cleanly, no question goes unanswered, and past the warm-up nothing a
leak shows first (open files, threads, asyncio tasks) has grown. Memory is
measured and reported, not judged here: two minutes of allocator warm-up
are not a trend (the 60-minute run in the README is).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, cli_flags


@pytest.mark.slow
def test_a_short_soak_loses_no_turn_and_leaks_no_handles(tmp_path: Path) -> None:
    from virtual_audio import skip_if_unavailable

    skip_if_unavailable()
    out = tmp_path / "soak.json"
    command = [sys.executable, "scripts/soak.py", "--minutes", "2", "--interrupt-every", "3",
               "--json", str(out), "--workdir", str(tmp_path / "soak"), *cli_flags()]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    data = json.loads(out.read_text())
    verdict, samples = data["verdict"], data["samples"]
    assert verdict["kiosk_alive_to_the_end"] and verdict["kiosk_exit"] == 0
    assert not verdict["traceback_in_log"]
    assert verdict["questions"] >= 3 and verdict["turns_lost"] == 0, verdict
    assert verdict["turn_statuses"].get("completed", 0) >= 2, verdict
    assert len(samples) >= 2 and all(s["rss_mb"] > 0 and s["fds"] > 0 for s in samples)
    growth = verdict["growth_after_warmup"]
    # A turn in flight at a sample holds a few tasks more than an idle kiosk.
    assert growth["fds"] <= 2 and growth["threads"] <= 2 and growth["asyncio_tasks"] <= 4, growth
