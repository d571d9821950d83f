"""From the language model's token stream to speakable chunks for the TTS.

The TTS (piper) can start speaking as soon as it has a chunk, so the first
chunk is cut as early as a clause boundary allows (time to first audio is
what the user feels); later chunks are cut at sentence ends, which gives
piper whole sentences and natural prosody while it stays ahead of playback.

:class:`Segmenter` is the pure, synchronous part. Its decisions depend only
on the text received so far, never on how the text was split into deltas:
a boundary is confirmed only once the character after it has been seen
(or the reply has ended), so "3.5", "e.g.", "Dr. Smith" and "..." never
split wrongly whatever the token boundaries were.

:func:`clean_text` runs on each chunk's *accumulated* raw text at cut time
(never per delta, so a ``**`` split across two deltas is still removed) and
strips what must never reach the voice: markdown, code blocks, HTML, URLs,
emoji and other pictographs.

:class:`ChunkerStage` wraps one segmenter per turn in the pipeline.
"""

from __future__ import annotations

import html
import logging
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .frames import Event, LLMDone, LLMToken, ReplyCancelled, TextChunk, TurnCancelled
from .runtime import PipelineContext, Stage

__all__ = ["Segmenter", "ChunkerStage", "clean_text"]

log = logging.getLogger("pipeline.chunker")

# --------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------

_FENCED = re.compile(r"(```|~~~).*?(?:\1|\Z)", re.S)
_HTML_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_IMAGE = re.compile(r"!\[[^\]\n]*\]\([^)\n]*\)")
_LINK = re.compile(r"\[([^\]\n]*)\]\([^)\n]*\)")
_LINK_TAIL = re.compile(r"\]\([^)\s]*\)")  # a link whose "[" was in the previous chunk
_CITATION = re.compile(r"\[\^?\d+\]")
_AUTOLINK = re.compile(r"<((?:https?://|www\.)[^>\s]+)>", re.I)
_URL = re.compile(
    r"(?:\bhttps?://|\bwww\.)[^\s<>()\[\]{}\"'`]*[^\s<>()\[\]{}\"'`.,;:!?*_~]",
    re.I,
)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
_DEGREES = re.compile(r"\s*(?:°\s*([CF])\b|°|(℃)|(℉))")
_QUOTE = re.compile(r"^(?:>\s?)+")
_HEADING = re.compile(r"^#{1,6}(?:\s+|$)")
_HEADING_TAIL = re.compile(r"\s+#+$")
_BULLET = re.compile(r"^[-*+•‣◦▪–]\s+")
_NUMBERED = re.compile(r"^\d{1,3}[.)]\s+")
_TIMES = re.compile(r"(?<=\d)\s*\*\s*(?=\d)")
_INTRAWORD_UNDERSCORE = re.compile(r"(?<=[^\W_])_+(?=[^\W_])")
_SPACED_DASH = re.compile(r"\s+(?:--|—|–)(?=\s|$)")
_TIGHT_DASH = re.compile(r"(?<=\w)—(?=\w)")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:…]+)(?=\s|$)")
_REPEATED_SOFT = re.compile(r"([,;:])(?:\s*[,;:])+")
_SOFT_BEFORE_HARD = re.compile(r"[,;:]\s*(?=[.!?…])")
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]|\{\s*\}")
_LEADING_PUNCT = re.compile(r"^[\s,;:.!?…)\]}]+")

_LINE_END_PUNCT = frozenset(".!?,;:…")
_RULE_CHARS = frozenset("|-:= \t")


@lru_cache(maxsize=8192)
def _unspeakable(ch: str) -> bool:
    """Emoji, pictographs, modifiers and invisible joiners: nothing to say."""
    cp = ord(ch)
    if 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF or cp == 0x20E3:
        return True  # variation selectors, keycap
    # So/Sk: symbols (emoji, skin tones, regional indicators), Cf: ZWJ and
    # tags, Co: private-use icons, Cn: emoji newer than this Unicode database.
    return unicodedata.category(ch) in ("So", "Sk", "Cf", "Co", "Cn")


def _degrees(match: re.Match[str]) -> str:
    unit = match.group(1) or ("C" if match.group(2) else "F" if match.group(3) else "")
    return {"C": " degrees Celsius", "F": " degrees Fahrenheit"}.get(unit, " degrees")


def _strip_symbols(text: str) -> str:
    if text.isascii():
        return text
    if "°" in text or "℃" in text or "℉" in text:
        text = _DEGREES.sub(_degrees, text)  # "°" is a symbol, but it has a name
    return "".join(ch for ch in text if ch < "\x80" or not _unspeakable(ch))


def _is_rule(line: str) -> bool:
    """A table separator row or a horizontal rule: layout, not words."""
    chars = set(line)
    if chars <= _RULE_CHARS and ("-" in chars or "=" in chars):
        return True
    compact = line.replace(" ", "")
    return len(compact) >= 3 and len(set(compact)) == 1 and compact[0] in "*_"


def _clean_lines(text: str, starts_line: bool) -> str:
    """Line-level markdown: headings, quotes, bullets, tables, rules.

    Line breaks between items without punctuation become a pause ("," or
    "." after a heading) so a list is not read as one run-on phrase.
    """
    parts: list[tuple[str, bool]] = []
    for k, line in enumerate(text.split("\n")):
        s = line.strip()
        if not s:
            continue
        heading = False
        if k > 0 or starts_line:  # line-start syntax only means something at a line start
            if _is_rule(s):
                continue
            s = _QUOTE.sub("", s)
            match = _HEADING.match(s)
            if match:
                heading = True
                s = _HEADING_TAIL.sub("", s[match.end() :])
            s = _NUMBERED.sub("", _BULLET.sub("", s, count=1), count=1)
        if "|" in s:
            s = ", ".join(cell for cell in (c.strip() for c in s.split("|")) if cell)
        if s:
            parts.append((s, heading))
    out: list[str] = []
    for k, (s, heading) in enumerate(parts):
        if k < len(parts) - 1:
            tail = s.rstrip("*_`~\"')]} ")
            if tail and tail[-1] not in _LINE_END_PUNCT:
                s += "." if heading else ","
        out.append(s)
    return " ".join(out)


def clean_text(raw: str, starts_line: bool = True) -> str:
    """Turn a chunk of the model's raw reply into text that piper can speak.

    Drops code blocks, images, HTML, emoji and pictographs; keeps link and
    inline-code text; replaces URLs with "the link"; removes markdown markers
    wherever they are (also unpaired ones, since bold may span two chunks).
    ``starts_line`` tells whether ``raw`` begins at the start of a line, so
    that "1. " or "- " mid-sentence is not mistaken for a list marker.
    Returns "" when nothing speakable (no letter or digit) is left.
    """
    s = raw
    if "```" in s or "~~~" in s:
        s = _FENCED.sub(" ", s)
    if "<" in s:
        s = _HTML_COMMENT.sub(" ", s)
        s = _AUTOLINK.sub(r" \1 ", s)
    if "](" in s or "[" in s:
        s = _IMAGE.sub("", s)
        s = _LINK.sub(r"\1", s)
        s = _LINK_TAIL.sub("", s)
        s = _CITATION.sub("", s)
    s = _URL.sub("the link", s)
    if "<" in s:
        s = _TAG.sub(" ", s)
    if "&" in s:
        s = html.unescape(s)
    s = _strip_symbols(s)
    s = _clean_lines(s, starts_line)
    # Inline markdown: code ticks, strikethrough, bold/italic markers.
    s = s.replace("`", "").replace("~~", "")
    if "*" in s:
        s = _TIMES.sub(" times ", s).replace("*", "")
    if "_" in s:
        s = _INTRAWORD_UNDERSCORE.sub(" ", s).replace("_", "")
    s = _SPACED_DASH.sub(",", s)
    s = _TIGHT_DASH.sub(", ", s)
    s = _EMPTY_BRACKETS.sub("", s).replace("[", "").replace("]", "")
    s = _SPACES.sub(" ", s)
    s = _SPACE_BEFORE_PUNCT.sub(r"\1", s)
    s = _REPEATED_SOFT.sub(r"\1", s)
    s = _SOFT_BEFORE_HARD.sub("", s)
    s = _LEADING_PUNCT.sub("", s).strip()
    if not any(ch.isalnum() for ch in s):
        return ""
    return s


# --------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------

_SENTENCE_END = frozenset(".!?…")
_CLAUSE_END = frozenset(",;:")
_DASHES = frozenset("-—–")
_INTERESTING = _SENTENCE_END | _CLAUSE_END | _DASHES
# Characters that may follow a sentence's punctuation before the space:
# closing quotes and brackets, and markdown markers ("**Note:** ...").
_CLOSERS = frozenset("\"'”’»)]}*_`")
# Abbreviations that are (practically) never the end of a sentence.
_TITLES = frozenset(
    "mr mrs ms dr prof sr jr st mt vs cf al gen col lt sgt capt rev hon fig approx dept".split()
)
# Abbreviations that end a sentence only when a capital letter follows.
_SOFT = frozenset({"etc", "a.m", "p.m"})
_DOTTED = re.compile(r"(?:[a-z]{1,2}\.)+[a-z]{1,2}")  # e.g, i.e, u.s, a.m, ph.d

_WAIT = -1  # "need to see more text before deciding"
_SENTENCE = 2
_CLAUSE = 1
_NONE = 0


# Words a spoken phrase naturally starts with: a forced first cut goes
# before one of them ("The capital of France | is Paris").
_PHRASE_STARTERS = frozenset(
    """is are was were has have had can will would should could of and or but in on at for with to
    from because which that who whose where when by as than about into after before during""".split()
)
_WORD = re.compile(r"\S+")


def _phrase_cut(buf: str, end: int, min_words: int) -> int:
    """Where to cut ``buf[:end]`` so the first chunk ends at a phrase boundary.

    The latest word boundary before a phrase-starting word, keeping at least
    ``min_words`` words; failing that, before a trailing number, so "93" and
    "million" stay together. 0 when there is no better place than ``end``.
    """
    spans = list(_WORD.finditer(buf, 0, end))
    for k in range(len(spans) - 1, min_words - 1, -1):
        word = spans[k].group().strip(".,;:!?\"'()").lower()
        if word in _PHRASE_STARTERS:
            return spans[k].start()
    if len(spans) > min_words and spans[-1].group().strip(".,").replace(",", "").isdigit():
        return spans[-1].start()
    return 0


class Segmenter:
    """Cuts one streamed reply into speakable chunks.

    The first chunk ends at the first clause boundary (``, ; : — --``) once
    it has ``first_min_words`` words, or at any sentence end; later chunks
    end at sentence ends (``. ! ? …`` or a line break) once they have
    ``min_words`` words. A chunk that would exceed ``max_words`` is cut at
    its last clause boundary, or after ``max_words`` words if it has none.
    Code blocks (``` anywhere, ~~~ at a line start) are cut off on their
    own and cleaned to nothing.

    Internally the raw text not yet emitted is scanned once, left to right;
    the scan stops wherever deciding needs a character not yet received, so
    the result is the same however the text was split into deltas.
    """

    def __init__(
        self, first_min_words: int = 3, min_words: int = 4, max_words: int = 30, first_max_words: int | None = None
    ) -> None:
        # The first chunk decides time to first audio: with no clause boundary
        # by ``first_max_words`` words it is cut at a word boundary there.
        if first_max_words is not None and first_max_words < first_min_words:
            raise ValueError("first_max_words must be at least first_min_words")
        self.first_max_words = first_max_words or max_words
        if min(first_min_words, min_words, max_words) < 1:
            raise ValueError("word limits must be at least 1")
        self.first_min_words = first_min_words
        self.min_words = min_words
        self.max_words = max_words
        self._reset()

    # -- public -------------------------------------------------------------

    def push(self, delta: str) -> list[str]:
        """Add a piece of the reply; return the chunks it completed."""
        if not delta:
            return []
        self._buf += delta
        return self._scan()

    def flush(self) -> list[str]:
        """The reply ended: return what is left, then start afresh."""
        self._final = True
        out = self._scan()
        if self._buf:
            text = clean_text(self._buf, self._seg_line_start)
            if text:
                out.append(text)
        self._reset()
        return out

    @property
    def emitted(self) -> int:
        """Chunks returned so far for the current reply."""
        return self._emitted

    # -- scanning -----------------------------------------------------------

    def _reset(self) -> None:
        self._buf = ""
        self._final = False
        self._emitted = 0
        self._seg_line_start = True
        self._restart()

    def _restart(self) -> None:
        """Scan state at the start of ``_buf`` (a fresh segment)."""
        self._pos = 0
        self._words = 0
        self._in_run = False
        self._run_start = 0
        self._run_alnum = False
        self._run_line_start = False
        self._line_start = self._seg_line_start
        self._fence = ""
        self._fallback = 0  # last clause cut point with >= min_words words before it

    def _scan(self) -> list[str]:
        out: list[str] = []
        while True:
            cut = self._advance()
            if cut <= 0:
                return out
            self._cut(cut, out)

    def _cut(self, at: int, out: list[str]) -> None:
        buf = self._buf
        text = clean_text(buf[:at], self._seg_line_start)
        if text:
            out.append(text)
            self._emitted += 1
        newline = buf.rfind("\n", 0, at)
        if newline >= 0:
            self._seg_line_start = not buf[newline + 1 : at].strip()
        else:
            self._seg_line_start = self._seg_line_start and not buf[:at].strip()
        self._buf = buf[at:]
        self._restart()  # rescans the kept tail (a few words at most)

    def _advance(self) -> int:
        """Scan on from ``_pos``; return a cut position, or 0 to wait for more."""
        buf = self._buf
        n = len(buf)
        final = self._final
        i = self._pos
        while i < n:
            c = buf[i]
            if self._fence:
                if c == self._fence and (c == "`" or self._line_start):
                    if i + 3 > n and not final:
                        break
                    if buf.startswith(c * 3, i):
                        j = i + 3
                        while j < n and buf[j] == c:
                            j += 1
                        if j == n and not final:
                            break
                        return j  # the code block is a segment of its own
                self._line_start = c == "\n" or (self._line_start and c in " \t")
                i += 1
                continue
            if c.isspace():
                self._in_run = False
                i += 1
                if c == "\n":
                    self._line_start = True
                    if self._boundary(_SENTENCE):
                        return i
                    if self._words >= self.min_words:
                        self._fallback = i
                continue
            if c == "`" or (c == "~" and self._line_start):
                if i + 3 > n and not final:
                    break
                if buf.startswith(c * 3, i):
                    if buf[:i].strip():
                        return i  # cut off the text before a code block
                    self._fence = c
                    self._line_start = False
                    i += 3
                    continue
            if not self._in_run:
                self._in_run = True
                self._run_start = i
                self._run_alnum = False
                self._run_line_start = self._line_start
            self._line_start = False
            if c in _INTERESTING:
                kind, at = self._punctuation(i)
                if kind == _WAIT:
                    break
                if kind and self._boundary(kind):
                    return at
                if kind and self._words >= self.min_words:
                    self._fallback = at
            elif not self._run_alnum and c.isalnum():
                self._run_alnum = True
                self._words += 1
                limit = self.first_max_words if self._emitted == 0 else self.max_words
                if self._words > limit:
                    if self._emitted == 0 and not self._fallback:
                        return _phrase_cut(buf, self._run_start, self.first_min_words) or self._run_start
                    return self._fallback or self._run_start
            i += 1
        self._pos = i
        return 0

    def _boundary(self, kind: int) -> bool:
        """Whether a confirmed boundary of ``kind`` ends the current chunk."""
        if self._emitted == 0:
            return kind == _SENTENCE or self._words >= self.first_min_words
        return kind == _SENTENCE and self._words >= self.min_words

    def _punctuation(self, i: int) -> tuple[int, int]:
        """Classify punctuation at ``i``: (kind, cut position) or (_WAIT, 0)."""
        buf = self._buf
        n = len(buf)
        final = self._final
        c = buf[i]
        if c in _DASHES:
            # Only a spaced dash is a clause boundary: " — ", " – ", " -- ".
            if i == 0 or not buf[i - 1].isspace():
                return _NONE, 0
            j = i + 1
            if c == "-":
                if j >= n:
                    return (_NONE, 0) if final else (_WAIT, 0)
                if buf[j] != "-":
                    return _NONE, 0
                j += 1
            if j >= n:
                return (_CLAUSE, j) if final else (_WAIT, 0)
            return (_CLAUSE, j) if buf[j].isspace() else (_NONE, 0)
        j = i + 1
        while j < n and buf[j] in _CLOSERS:
            j += 1
        if j >= n:
            if not final:
                return _WAIT, 0
        elif not buf[j].isspace():
            return _NONE, 0  # "3.5", "e.g", "...", "?!", "10:30", "3,000"
        if c in _CLAUSE_END:
            return _CLAUSE, j
        if c != ".":
            return _SENTENCE, j
        return self._full_stop(i, j)

    def _full_stop(self, i: int, j: int) -> tuple[int, int]:
        """Is the confirmed "." at ``i`` a sentence end, or an abbreviation?"""
        buf = self._buf
        if i > 0 and buf[i - 1] == ".":
            return _SENTENCE, j  # an ellipsis "..." followed by a space
        word = buf[self._run_start : i]
        k = 0
        while k < len(word) and not word[k].isalnum():
            k += 1
        core = word[k:]
        if not core:
            return _SENTENCE, j
        if core.isdigit():
            # "1. " opening a line is a list marker; "in 2024. " ends a sentence.
            return (_NONE, 0) if (k == 0 and self._run_line_start and len(core) <= 3) else (_SENTENCE, j)
        low = core.lower()
        if low in _SOFT:
            return self._soft_stop(j)
        if low in _TITLES or _DOTTED.fullmatch(low):
            return _NONE, 0
        if len(core) == 1 and core.isupper() and core != "I":
            return _NONE, 0  # an initial: "J. R. R. Tolkien"
        return _SENTENCE, j

    def _soft_stop(self, j: int) -> tuple[int, int]:
        """"etc." / "p.m." end a sentence only before a capital or a line break."""
        buf = self._buf
        n = len(buf)
        k = j
        while k < n and buf[k].isspace():
            k += 1
        if k >= n:
            return (_SENTENCE, j) if self._final else (_WAIT, 0)
        if "\n" in buf[j:k] or buf[k].isupper():
            return _SENTENCE, j
        return _NONE, 0


# --------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------


@dataclass
class _TurnText:
    segmenter: Segmenter
    sent: int = 0


class ChunkerStage(Stage):
    """Turns each turn's :class:`LLMToken` stream into :class:`TextChunk` s.

    The turn's last chunk has ``last=True``. If the reply left nothing to
    say, a ``TextChunk`` with empty text and ``last=True`` is still sent: the
    TTS stage treats empty text as "end of reply only" (nothing to
    synthesize) so it can close the turn. ``LLMToken`` and ``LLMDone`` are
    consumed here (observers already saw them on the bus); every other item
    passes through unchanged.
    """

    name = "chunker"
    scope = "reply"
    max_live_turns = 16
    """Unfinished turns kept at most (oldest dropped): memory stays bounded
    even if a turn ends without LLMDone and without being cancelled."""

    def __init__(
        self,
        ctx: PipelineContext,
        first_min_words: int = 3,
        min_words: int = 4,
        max_words: int = 30,
        first_max_words: int | None = None,
    ) -> None:
        super().__init__(ctx)
        Segmenter(first_min_words, min_words, max_words, first_max_words)  # validate early
        self.first_max_words = first_max_words
        self.first_min_words = first_min_words
        self.min_words = min_words
        self.max_words = max_words
        self._turns: dict[int | None, _TurnText] = {}
        self._unsubscribe = ctx.bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, (TurnCancelled, ReplyCancelled)):
            self._turns.pop(event.turn_id, None)

    def _state(self, turn_id: int | None) -> _TurnText:
        state = self._turns.get(turn_id)
        if state is None:
            while len(self._turns) >= self.max_live_turns:
                stale = next(iter(self._turns))
                log.warning("chunker: dropping unfinished turn %s", stale)
                del self._turns[stale]
            segmenter = Segmenter(self.first_min_words, self.min_words, self.max_words, self.first_max_words)
            state = self._turns[turn_id] = _TurnText(segmenter)
        return state

    @property
    def live_turns(self) -> int:
        """Turns with a reply in progress (for tests and health checks)."""
        return len(self._turns)

    async def handle(self, item: Any) -> None:
        if isinstance(item, LLMToken):
            if self.ctx.turns.is_cancelled(item.turn_id):
                return
            state = self._state(item.turn_id)
            for text in state.segmenter.push(item.text):
                index = state.sent
                state.sent += 1
                await self.send(TextChunk(turn_id=item.turn_id, text=text, index=index))
        elif isinstance(item, LLMDone):
            done = self._turns.pop(item.turn_id, None)
            sent = done.sent if done else 0
            texts = done.segmenter.flush() if done else []
            if not texts:
                texts = [""]  # "end only": lets the TTS close the turn
            for k, text in enumerate(texts):
                last = k == len(texts) - 1
                await self.send(TextChunk(turn_id=item.turn_id, text=text, index=sent + k, last=last))
        else:
            await self.send(item)

    async def finish(self) -> None:
        """Input ended: replies without LLMDone will never finish; forget them."""
        self._turns.clear()
        self._unsubscribe()
