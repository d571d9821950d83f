"""What the ASR stage does to Whisper's text before anyone reads it."""

from __future__ import annotations

import pytest

from pipeline.asr import agreed_prefix, collapse_repeats, degenerate, drop_echoed_phrase


@pytest.mark.parametrize(
    "text, kept",
    [
        # Seen with a 5 s and a 7 s window: the question, then its echo.
        ("What is the capital of France? What is the capital of France", "What is the capital of France?"),
        ("How far is the sun? How far is the sun?", "How far is the sun?"),
        ("What is the capital of France? What is the", "What is the capital of France?"),
        ("one two three one two three one two three", "one two three"),
    ],
)
def test_an_echo_of_the_opening_words_is_cut(text: str, kept: str) -> None:
    assert drop_echoed_phrase(text) == kept


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello there",
        "What is the capital of France?",
        # Too short an echo to tell from speech: two words, or under half the phrase.
        "What is the capital of France? What is",
        "My homework. My homework.",
        # Repeats that do not start the text again are speech, not an echo.
        "the cat sat on the mat",
        "I said no no no no",
        "Tell me more, tell me more about it",
    ],
)
def test_speech_without_an_echo_is_kept(text: str) -> None:
    assert drop_echoed_phrase(text) == text


def test_a_looped_decode_is_collapsed() -> None:
    text = "do do do do do do do"
    assert degenerate(text)
    assert collapse_repeats(text) == "do"
    assert not degenerate("What is the boiling point of water?")


def test_agreed_prefix_ignores_case_and_punctuation() -> None:
    assert agreed_prefix("What is the".split(), "what is the capital?".split()) == 3
    assert agreed_prefix("Who wrote".split(), "How wrote".split()) == 0
