"""Per-turn timelines: where the time between "user stopped" and "reply
starts" goes, streaming pipeline against the naive cascade.

One row per turn, its naive twin right under it, every row aligned on its own
end of speech (x = 0), so the voice-to-voice gap is the distance from the
zero line to the start of the reply audio. Drawn on a bare Agg figure (no
pyplot state), so it works headless and from any thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.metrics import SPAN

__all__ = ["plot_timelines"]

# Bars are spans of pipeline/metrics.py, markers its milestones (and the
# partial transcripts, when a turn lists them).
# Colours: user (greys/blues), recognition, language model, synthesis, reply.
_STYLE = {
    "user_speech": dict(facecolor="#9ecae1", label="user speech"),
    "end_of_speech": dict(facecolor="#d9d9d9", hatch="///", edgecolor="#969696", label="VAD hangover"),
    "tool_call": dict(facecolor="#fd8d3c", hatch="xx", edgecolor="#a63603", label="tool call"),
    "llm_full_reply": dict(facecolor="#fdae6b", label="LLM first token .. done"),
    "tts_full_reply": dict(facecolor="#c7b9e2", label="TTS synthesis (whole reply)"),
    "reply_audio": dict(facecolor="#74c476", label="reply audio"),
}
_MARKERS = {
    "asr_partial": dict(marker="|", color="#3182bd", markersize=9, label="ASR partial"),
    "asr_final": dict(marker="D", color="#08519c", markersize=6, label="ASR final"),
    "llm_first_token": dict(marker=">", color="#e6550d", markersize=7, label="LLM first token"),
    "first_chunk": dict(marker="s", color="#a63603", markersize=5, label="first chunk"),
    "tts_first_audio": dict(marker="^", color="#6a51a3", markersize=7, label="TTS first audio"),
    "tts_done": dict(marker="v", color="#54278f", markersize=6, label="TTS done"),
}
_BAR = 0.6


def _pair(streaming: list[dict[str, Any]], naive: list[dict[str, Any]] | None) -> list[tuple[str, dict[str, Any]]]:
    """Rows in drawing order: each streaming turn, then its naive twin.

    Twins are matched by ``file`` when every turn has one (a file may give
    the streaming run several turns), else by position.
    """
    rows: list[tuple[str, dict[str, Any]]] = []
    naive = list(naive or [])
    by_file = bool(naive) and all("file" in t for t in [*streaming, *naive])
    used: set[int] = set()
    for i, turn in enumerate(streaming):
        rows.append(("streaming", turn))
        twin = None
        if by_file:
            twin = next((j for j, n in enumerate(naive) if j not in used and n["file"] == turn["file"]), None)
        elif i < len(naive):
            twin = i
        if twin is not None:
            used.add(twin)
            rows.append(("naive", naive[twin]))
    rows.extend(("naive", n) for j, n in enumerate(naive) if j not in used)
    return rows


def _aligned(turn: dict[str, Any]) -> tuple[dict[str, float], bool]:
    """Milestones in ms from the turn's end of speech; False if it had none to align on."""
    ms = {k: float(v) for k, v in (turn.get("milestones_ms") or {}).items() if isinstance(v, int | float)}
    if "speech_end" in ms:
        ref = ms["speech_end"]
    elif "first_audio_out" in ms and turn.get("voice_to_voice_ms") is not None:
        ref = ms["first_audio_out"] - float(turn["voice_to_voice_ms"])
    else:
        return ms, False
    out = {k: v - ref for k, v in ms.items()}
    if "reply_end" not in out and "first_audio_out" in out and turn.get("reply_audio_seconds"):
        out["reply_end"] = out["first_audio_out"] + 1000 * float(turn["reply_audio_seconds"])
    partials = turn.get("asr_partials_ms") or []  # optional: not in the product's report yet
    for i, v in enumerate(partials):
        out[f"asr_partial.{i}"] = float(v) - ref
    return out, True


def _label(kind: str, turn: dict[str, Any], index: int) -> str:
    if "file" in turn:
        name = Path(str(turn["file"])).stem
    elif turn.get("transcript"):
        words = str(turn["transcript"]).split()
        name = " ".join(words[:4]) + (" ..." if len(words) > 4 else "")
    else:
        name = f"turn {turn.get('turn', index + 1)}"
    return f"{name}\n{kind}"


def plot_timelines(
    streaming_turns: list[dict[str, Any]], naive_turns: list[dict[str, Any]] | None, out_png: Path
) -> None:
    """Write a PNG with one timeline row per turn (and its naive twin under it).

    Turn dicts are report turns (``TurnReport.turn_json`` or
    :func:`assistant.evaluation.naive.naive_turn`); any milestone may be missing, and
    whatever exists is drawn.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = _pair(list(streaming_turns), naive_turns)
    fig = Figure(figsize=(12, max(2.8, 0.62 * len(rows) + 2.0)), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    used: set[str] = set()
    lo, hi = -500.0, 1000.0
    ends: list[tuple[int, float, str]] = []

    def span(y: int, key: str, ms: dict[str, float]) -> None:
        a, b = SPAN[key].start, SPAN[key].end
        if a in ms and b in ms and ms[b] >= ms[a]:
            ax.barh(y, ms[b] - ms[a], left=ms[a], height=_BAR, linewidth=0.6, **{
                k: v for k, v in _STYLE[key].items() if k != "label"
            })
            used.add(key)

    for y, (kind, turn) in enumerate(rows):
        ms, ok = _aligned(turn)
        if kind == "naive":
            ax.axhspan(y - 0.5, y + 0.5, color="#f7f7f7", zorder=0)
        for key in _STYLE:
            span(y, key, ms)
        for name, value in ms.items():
            key = "asr_partial" if name.startswith("asr_partial.") else name
            if key in _MARKERS:
                style = {k: v for k, v in _MARKERS[key].items() if k != "label"}
                ax.plot([value], [y], linestyle="none", zorder=3, **style)
                used.add(key)
        if ms:
            lo, hi = min(lo, *ms.values()), max(hi, *ms.values())
        v2v = turn.get("voice_to_voice_ms")
        text = f"v2v {float(v2v):,.0f} ms" if isinstance(v2v, int | float) else "v2v n/a"
        if not ok:
            text += " (unaligned)"
        ends.append((y, max(ms.values(), default=0.0), text))

    width = hi - lo
    for y, end, text in ends:
        ax.text(end + 0.01 * width, y, text, va="center", ha="left", fontsize=9, fontweight="bold")
    ax.set_xlim(lo - 0.02 * width, hi + 0.14 * width)
    ax.axvline(0, color="#de2d26", linewidth=1.2, linestyle="--", zorder=4)
    ax.set_yticks(range(len(rows)), [_label(kind, t, i) for i, (kind, t) in enumerate(rows)], fontsize=8)
    ax.set_ylim(max(1, len(rows)) - 0.5, -0.5)  # first turn on top
    ax.set_xlabel("ms from the end of the user's speech (0 = user stopped speaking); label = voice to voice")
    ax.grid(axis="x", color="#e0e0e0", linewidth=0.6)
    ax.set_axisbelow(True)
    title = "Turn timelines: streaming pipeline" + (" vs naive cascade" if naive_turns else "")
    ax.set_title(title, fontsize=12)
    if not rows:
        ax.text(0.5, 0.5, "no turns", transform=ax.transAxes, ha="center", va="center")

    handles: list[Any] = [Line2D([], [], color="#de2d26", linestyle="--", label="end of user speech")]
    for key, style in _STYLE.items():
        if key in used:
            handles.append(Patch(**style))
    for key, style in _MARKERS.items():
        if key in used:
            handles.append(Line2D([], [], linestyle="none", **style))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out_png), dpi=120, bbox_inches="tight")
