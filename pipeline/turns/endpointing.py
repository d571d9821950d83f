"""Endpointing: how much silence ends a turn, from the words heard so far.

The VAD only measures silence; this rule says how much of it is enough. The
turn controller applies it to the transcript decoded at a pause (and, where
enabled, the semantic model's score of the voice, pipeline/turns/semantic.py)
and tells the VAD the result (:meth:`pipeline.vad.VADStage.require_silence`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Words a finished sentence does not end with.
_CONNECTORS = frozenset(
    """a an the and or but nor to of in on at by for with about from into onto than as
    my your his her its our their if because although though while until unless whether
    um uh er erm hmm""".split()
)
# Words that end an unfinished statement ("what I want is ...") but also
# finished questions ("how many legs does a spider have?").
_AUXILIARIES = frozenset(
    """is are was were be been am can could would should will shall may might must
    do does did have has had not very like that which who what""".split()
)


@dataclass(frozen=True)
class EndpointRule:
    """How long a pause ends the turn, from the words heard so far.

    A pause after a complete question or sentence (ends in ``?``, ``!`` or
    ``.`` and the last word does not leave it hanging) ends the turn after
    ``complete_ms`` of silence; a pause after an unfinished phrase ("I want
    to go to ...": a trailing article, preposition or conjunction, a comma or
    dash, or an auxiliary such as *is* outside a question) waits
    ``incomplete_ms``; anything else waits the VAD's own ``silence_ms``.

    The semantic model's score (``semantic_ms`` set) is a second opinion that
    can only shorten a wait, never lengthen one: it has scored plainly
    complete questions "unfinished", and the words' "unfinished" stands
    whatever it says. Where both say complete, ``semantic_ms`` ends the turn;
    where the words cannot tell and it says complete, ``complete_ms`` does.
    """

    complete_ms: int = 300
    incomplete_ms: int = 1000
    semantic_ms: int | None = None  # None: no semantic opinion is asked
    semantic_threshold: float = 0.5

    def classify(self, text: str) -> Literal["complete", "unfinished"] | None:
        """Whether the words so far read as a finished turn (None: can't tell)."""
        stripped = text.strip()
        if not stripped:
            return None
        words = stripped.split()
        last = "".join(ch for ch in words[-1].lower() if ch.isalnum() or ch == "'")
        question = stripped.endswith("?")
        if (
            stripped.endswith((",", "-", "—", "...", "…"))
            or last in _CONNECTORS
            or (last in _AUXILIARIES and not question)
        ):
            return "unfinished"
        if stripped.endswith(("?", "!", ".")):
            return "complete"
        return None

    def silence_ms(self, text: str, score: float | None = None) -> int | None:
        """The silence that ends the turn after ``text`` (None: the VAD's own),
        given the semantic model's P(complete) where there is one."""
        kind = self.classify(text)
        if kind == "unfinished":
            return self.incomplete_ms
        semantic = self.semantic_ms
        agrees = semantic is not None and score is not None and score >= self.semantic_threshold
        if kind == "complete":
            return min(self.complete_ms, semantic) if agrees and semantic is not None else self.complete_ms
        return self.complete_ms if agrees else None
