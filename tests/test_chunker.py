"""Tests of the chunker: segmentation rules, cleaning, and the pipeline stage."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

import pytest

from fakes import context
from pipeline.chunker import ChunkerStage, Segmenter, clean_text
from pipeline.frames import END, EndOfStream, LLMDone, LLMToken, TextChunk, TranscriptFinal
from pipeline.runtime import Channel, PipelineContext


def chunks_of(text: str, pieces: list[str] | None = None, **limits: int) -> list[str]:
    """Run a whole reply through a fresh segmenter, in the given pieces."""
    segmenter = Segmenter(**limits)
    out: list[str] = []
    for piece in pieces if pieces is not None else [text]:
        out += segmenter.push(piece)
    return out + segmenter.flush()


def char_by_char(text: str, **limits: int) -> list[str]:
    return chunks_of(text, list(text), **limits)


# --------------------------------------------------------------------------
# Segmentation rules
# --------------------------------------------------------------------------


def test_first_chunk_at_sentence_end_even_if_short() -> None:
    reply = "Sure! The capital of France is Paris, a city known for the Eiffel Tower. It has about two million people."
    assert char_by_char(reply) == [
        "Sure!",
        # later chunks ignore the comma: whole sentences give piper better prosody
        "The capital of France is Paris, a city known for the Eiffel Tower.",
        "It has about two million people.",
    ]


def test_first_chunk_at_first_clause_boundary() -> None:
    reply = "The capital of France is Paris, a city known for the Eiffel Tower. It has about two million people."
    assert char_by_char(reply)[0] == "The capital of France is Paris,"


def test_first_chunk_is_emitted_as_soon_as_the_boundary_is_confirmed() -> None:
    segmenter = Segmenter()
    assert segmenter.push("The capital of France is Paris") == []
    assert segmenter.push(",") == []  # "," not yet confirmed: "3,000" is not a boundary
    assert segmenter.push(" a") == ["The capital of France is Paris,"]
    assert segmenter.push(" city.") == []
    assert segmenter.flush() == ["a city."]


def test_first_chunk_clause_needs_first_min_words() -> None:
    # "Well," (1 word) is too short; the next clause boundary is taken instead.
    assert char_by_char("Well, the answer is simple: yes, it is.")[0] == "Well, the answer is simple:"
    assert char_by_char("Well, the answer is simple: yes.", first_min_words=1)[0] == "Well,"


@pytest.mark.parametrize("dash", [" — ", " -- ", " – "])
def test_spaced_dash_is_a_clause_boundary(dash: str) -> None:
    chunks = char_by_char(f"Paris is lovely{dash}especially in the spring.")
    assert chunks == ["Paris is lovely,", "especially in the spring."]


def test_unspaced_hyphens_do_not_cut() -> None:
    chunks = char_by_char("A well-known state-of-the-art model--really good one, indeed.")
    assert chunks[0] == "A well-known state-of-the-art model--really good one,"


def test_later_short_sentences_are_merged_until_min_words() -> None:
    reply = "Hello there! Yes. No. It is four words. Okay then."
    assert char_by_char(reply) == ["Hello there!", "Yes. No. It is four words.", "Okay then."]


def test_later_chunks_ignore_clause_boundaries() -> None:
    reply = "Okay. First, mix the flour; then, add the eggs: all of them. Done."
    # The trailing short sentence is what flush() leaves: it is spoken on its own.
    assert char_by_char(reply) == ["Okay.", "First, mix the flour; then, add the eggs: all of them.", "Done."]


def test_question_exclamation_and_ellipsis_end_sentences() -> None:
    reply = "Hi! Do you really want to know?! I am thinking about it… Well... let me say it now."
    assert char_by_char(reply) == [
        "Hi!",
        "Do you really want to know?!",
        "I am thinking about it…",
        "Well... let me say it now.",
    ]


def test_line_breaks_end_sentences() -> None:
    reply = "Here you go\nThe first line of text here\nand the second line of text\n\nA new paragraph starts here"
    assert char_by_char(reply) == [
        "Here you go",
        "The first line of text here",
        "and the second line of text",
        "A new paragraph starts here",
    ]


def test_closing_quotes_and_brackets_after_punctuation() -> None:
    reply = 'Okay. He said "stop right there now." Then it ended (as we all expected.) Fine.'
    assert char_by_char(reply) == [
        "Okay.",
        'He said "stop right there now."',
        "Then it ended (as we all expected.)",
        "Fine.",
    ]


def test_max_words_cuts_at_last_clause_boundary() -> None:
    words = " ".join(f"w{k}" for k in range(20))
    reply = f"Right. one two three four five six, {words} end."
    chunks = char_by_char(reply, max_words=10)
    assert chunks[0] == "Right."
    assert chunks[1] == "one two three four five six,"
    assert all(len(c.split()) <= 10 for c in chunks)
    assert " ".join(chunks).split() == reply.split()  # nothing lost or duplicated


def test_max_words_cuts_at_max_words_without_clause_boundary() -> None:
    reply = " ".join(f"word{k}" for k in range(25)) + "."
    chunks = char_by_char(reply, max_words=10)
    assert [len(c.split()) for c in chunks] == [10, 10, 5]
    assert chunks[0] == " ".join(f"word{k}" for k in range(10))
    assert chunks[-1].endswith("word24.")


def test_max_words_ignores_clause_boundary_that_leaves_a_tiny_chunk() -> None:
    # The only clause boundary is after one word: cutting there would leave
    # "So," alone, so the chunk is cut at max_words instead.
    reply = "Done. So, " + " ".join(f"x{k}" for k in range(15)) + "."
    chunks = char_by_char(reply, max_words=8)
    assert chunks[1] == "So, x0 x1 x2 x3 x4 x5 x6"
    assert all(len(c.split()) <= 8 for c in chunks)


def test_flush_returns_unterminated_remainder_and_resets() -> None:
    segmenter = Segmenter()
    assert segmenter.push("Sure. And then it") == ["Sure."]
    assert segmenter.flush() == ["And then it"]
    assert segmenter.emitted == 0  # reusable for the next reply
    assert segmenter.push("Ok.") == []  # "." unconfirmed until more text or flush
    assert segmenter.flush() == ["Ok."]
    assert segmenter.flush() == []


# --------------------------------------------------------------------------
# Abbreviations and numbers
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sentence",
    [
        "It costs 3.5 dollars per kilo today.",
        "Ask Dr. Smith and Mrs. Jones about it today.",
        "Fruits, e.g. apples, i.e. the red ones are good.",
        "She moved to the U.S. last year for work.",
        "Meet at St. Paul's church around noon.",
        "It is Paris vs. London in the final.",
        "Bring pens, paper, etc. to the meeting tomorrow.",
        "It opens at 9 a.m. every day of the week.",
        "Read J. R. R. Tolkien for a while now.",
        "The population is 2,100,000 at 10:30 today.",
    ],
)
@pytest.mark.parametrize("first", [True, False])
def test_abbreviations_and_decimals_do_not_split(sentence: str, first: bool) -> None:
    lead = "" if first else "Okay. "
    chunks = char_by_char(f"{lead}{sentence} Next one.", first_min_words=100)
    assert chunks == ([] if first else ["Okay."]) + [sentence, "Next one."]


def test_ellipsis_is_not_split_between_its_dots() -> None:
    assert char_by_char("Well... I think so. Maybe... or maybe not, who knows.") == [
        "Well...",  # a sentence end always ends the first chunk
        "I think so. Maybe...",
        "or maybe not, who knows.",
    ]


def test_soft_abbreviations_end_a_sentence_before_a_capital() -> None:
    reply = "Okay. We sell apples, pears, plums, etc. The shop opens at 9 a.m. Come early to the shop."
    assert char_by_char(reply) == [
        "Okay.",
        "We sell apples, pears, plums, etc.",
        "The shop opens at 9 a.m.",
        "Come early to the shop.",
    ]


def test_numbers_ending_a_sentence_and_list_markers() -> None:
    reply = "Okay. It happened in 2024. Then:\n1. Preheat the oven now\n2. Bake it for an hour."
    assert char_by_char(reply) == [
        "Okay.",
        "It happened in 2024.",
        "Then: Preheat the oven now",  # "Then:" is too short to stand alone later on
        "Bake it for an hour.",
    ]


# --------------------------------------------------------------------------
# Split invariance
# --------------------------------------------------------------------------

TRICKY_REPLIES = [
    "Sure! The capital of France is Paris, a city known for the Eiffel Tower. It has about two million people.",
    "I saw Dr. Smith at 3.5 p.m. today, e.g. at the U.S. embassy etc. and left. Then we went home at 5 p.m. "
    "Everyone was tired... but happy! Really?! Yes.",
    "Here's a recipe:\n\n1. Preheat the **oven** to 200°C.\n2. Mix the flour and the sugar\n3. Bake for 20 minutes\n\n"
    "```python\nprint('a. b. c.')\nx = 1\n```\nThat's it 🎉! See [the docs](https://example.com/x) or https://foo.org/bar.",
    "## Paris\n\n| City | Population |\n|---|---|\n| Paris | 2.1 million |\n| Lyon | 500,000 |\n\n"
    "> Note: this is a quote from *someone* who knows.\n\n---\n\nAnd __that__ is all, folks!",
    "Well — honestly -- I don't know 👍🏽 🇫🇷 ❤️ 👨‍👩‍👧 what to say here because it is a very long sentence that goes "
    "on and on without any punctuation at all so it must be cut somewhere along the way before it gets too long",
    "**Note:** use `pip install x`. It's *really* easy, e.g. one line.<br>Done… ok? Visit www.example.org. Bye!",
    "Well, the answer is simple: yes, it is. Prices: $3.50, €4, 10% off — today only!!! Ask Mr. T. Smith Jr. now.",
    "~~~\ncode only\n~~~",
    "",
]


def _assert_invariant(text: str, pieces: list[str]) -> None:
    assert "".join(pieces) == text
    assert chunks_of(text, pieces) == chunks_of(text), pieces


@pytest.mark.parametrize("text", TRICKY_REPLIES)
def test_split_at_every_position_gives_the_same_chunks(text: str) -> None:
    whole = chunks_of(text)
    if text.strip() and "code only" not in text:
        assert whole  # the corpus is meant to produce chunks
    assert char_by_char(text) == whole
    for k in range(len(text) + 1):
        _assert_invariant(text, [text[:k], text[k:]])


@pytest.mark.parametrize("text", TRICKY_REPLIES)
def test_random_splits_give_the_same_chunks(text: str) -> None:
    rng = random.Random(hash(text) & 0xFFFF)
    for _ in range(60):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 30))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        _assert_invariant(text, pieces)


@pytest.mark.parametrize("limits", [{"first_min_words": 1, "min_words": 1, "max_words": 3}, {"max_words": 6}])
def test_split_invariance_holds_with_tight_limits(limits: dict[str, int]) -> None:
    rng = random.Random(7)
    for text in TRICKY_REPLIES:
        whole = chunks_of(text, None, **limits)
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 12)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            assert chunks_of(text, pieces, **limits) == whole


# --------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------


def test_markdown_emphasis_headings_and_quotes_are_removed() -> None:
    chunks = char_by_char("# Title\n\nThis is **very** _important_ and *nice*, really.\n> A quoted line of text here.")
    assert chunks == ["Title", "This is very important and nice, really.", "A quoted line of text here."]
    assert not any(mark in "".join(chunks) for mark in "*_#>")


def test_markdown_marker_split_across_deltas_is_removed() -> None:
    pieces = ["This ", "is ", "*", "*bold", "*", "* and ", "_", "_strong_", "_ text.", " Ok"]
    assert chunks_of("".join(pieces), pieces) == ["This is bold and strong text.", "Ok"]


def test_bold_spanning_two_chunks_leaves_no_markers() -> None:
    assert char_by_char("Okay. **This is bold text here. And still bold here.** Done now.") == [
        "Okay.",
        "This is bold text here.",
        "And still bold here.",
        "Done now.",
    ]


def test_lists_and_tables_are_read_as_phrases() -> None:
    reply = "Options:\n- Paris\n- Lyon\n* Nice\n\n| City | Rank |\n|:---|---:|\n| Paris | 1 |\n"
    assert char_by_char(reply) == ["Options:", "Paris, Lyon, Nice, City, Rank", "Paris, 1"]


def test_code_blocks_are_dropped_and_inline_code_kept() -> None:
    reply = "Run this command now:\n```bash\npip install requests. Then more.\n```\nThen call `get()` to fetch it."
    chunks = char_by_char(reply)
    assert chunks == ["Run this command now:", "Then call get to fetch it."]  # "()" is not spoken


def test_unterminated_code_block_is_dropped() -> None:
    assert char_by_char("Here it is:\n```python\nprint('hello world. Yes.')\n") == ["Here it is:"]


def test_links_images_urls_and_html() -> None:
    reply = (
        "See [the official docs](https://docs.python.org/3/) for details. "
        "![a diagram](https://x.org/d.png) Or visit https://example.com/a_b?c=1. "
        "Also <b>bold</b> and <https://auto.link/x> work. Check www.python.org today."
    )
    text = " ".join(char_by_char(reply))
    assert "http" not in text and "www" not in text and "<" not in text and "diagram" not in text
    assert text == (
        "See the official docs for details. Or visit the link. Also bold and the link work. Check the link today."
    )


def test_link_split_by_a_clause_cut_leaves_no_syntax() -> None:
    chunks = char_by_char("Go to [Paris, France](https://fr.example/paris) for more info.")
    assert chunks == ["Go to Paris,", "France for more info."]


def test_emoji_and_pictographs_are_removed() -> None:
    reply = "Great job 🎉! Thumbs up 👍🏽 for France 🇫🇷 and the family 👨‍👩‍👧 ❤️ 1️⃣ ✨ ok."
    assert char_by_char(reply) == ["Great job!", "Thumbs up for France and the family 1 ok."]


def test_reply_of_only_emoji_and_markup_gives_no_chunk() -> None:
    assert char_by_char("🎉🎉\n\n---\n**  **\n```\ncode\n```") == []


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("It is 25°C outside.", "It is 25 degrees Celsius outside."),
        ("Use snake_case names.", "Use snake case names."),
        ("Compute 2 * 3 now.", "Compute 2 times 3 now."),
        ("~~old~~ new price", "old new price"),
        ("Tom &amp; Jerry", "Tom & Jerry"),
        ("A citation[1] here.", "A citation here."),
        ("  lots   of \t space  ", "lots of space"),
        ("C# is a language", "C# is a language"),
        ("Nice — really nice", "Nice, really nice"),
        ("Caf\u00e9 au lait", "Caf\u00e9 au lait"),  # accented letters are speech, not symbols
        ("Price: $5, or €4 ©", "Price: $5, or €4"),
        ("1. Not a list mid-line", "1. Not a list mid-line"),
        ("Great job 🎉 !", "Great job!"),
        ("Use .NET or C++ here", "Use .NET or C++ here"),
    ],
)
def test_clean_text_cases(raw: str, spoken: str) -> None:
    assert clean_text(raw, starts_line=not raw.startswith("1.")) == spoken


def test_clean_text_line_start_rules_only_at_line_start() -> None:
    assert clean_text("1. First item", starts_line=True) == "First item"
    assert clean_text("- dash item", starts_line=True) == "dash item"
    assert clean_text("- minus five", starts_line=False) == "- minus five"


def test_clean_text_nothing_speakable() -> None:
    for raw in ["", "   ", "🎉", "**", "---", "| --- | --- |", "```x = 1```", "![img](http://x/y.png)", ". , !"]:
        assert clean_text(raw) == "", raw


# --------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------


def test_push_is_fast_per_token() -> None:
    reply = " ".join(TRICKY_REPLIES[:7]) * 20  # ~16k characters
    tokens = [reply[k : k + 4] for k in range(0, len(reply), 4)]
    segmenter = Segmenter()
    started = time.perf_counter()
    chunks: list[str] = []
    for token in tokens:
        chunks += segmenter.push(token)
    chunks += segmenter.flush()
    elapsed = time.perf_counter() - started
    assert len(chunks) > 100
    assert elapsed / len(tokens) < 200e-6, f"{elapsed / len(tokens) * 1e6:.1f} µs per token"


# --------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------


def _context() -> PipelineContext:
    return context()[0]


def _stage(ctx: PipelineContext, **limits: int) -> tuple[ChunkerStage, Channel[Any]]:
    stage = ChunkerStage(ctx, limits.get("first_min_words", 3), limits.get("min_words", 4), limits.get("max_words", 30))
    outbox: Channel[Any] = Channel("tts.in", maxsize=10_000)
    stage.outbox = outbox
    return stage, outbox


async def _drain(channel: Channel[Any]) -> list[Any]:
    items = []
    while len(channel):
        items.append(await channel.get())
    return items


def _tokens(turn_id: int, text: str, size: int = 3) -> list[LLMToken]:
    return [LLMToken(turn_id=turn_id, text=text[k : k + size], index=n) for n, k in enumerate(range(0, len(text), size))]


def test_stage_emits_indexed_chunks_and_marks_the_last() -> None:
    reply = "Sure! The capital of France is Paris, a city known for the Eiffel Tower. It has about two million people."

    async def main() -> tuple[list[Any], list[Any], ChunkerStage]:
        ctx = _context()
        published: list[Any] = []
        ctx.bus.subscribe(published.append)
        stage, outbox = _stage(ctx)
        turn = ctx.turns.new()
        runner = asyncio.create_task(stage.run())
        heard = TranscriptFinal(turn_id=turn.id, text="What is the capital of France?")
        await stage.inbox.put(heard)
        for token in _tokens(turn.id, reply):
            await stage.inbox.put(token)
        await stage.inbox.put(LLMDone(turn_id=turn.id, text=reply, tokens=10, finish_reason="stop"))
        await stage.inbox.put(END)
        await asyncio.wait_for(runner, 5)
        return await _drain(outbox), published, stage

    items, published, stage = asyncio.run(main())
    assert isinstance(items[0], TranscriptFinal)  # other items pass through unchanged
    assert isinstance(items[-1], EndOfStream)
    chunks = [i for i in items if isinstance(i, TextChunk)]
    assert [(c.text, c.index, c.last) for c in chunks] == [
        ("Sure!", 0, False),
        ("The capital of France is Paris, a city known for the Eiffel Tower.", 1, False),
        ("It has about two million people.", 2, True),
    ]
    assert all(c.turn_id == 1 for c in chunks)
    assert [e for e in published if isinstance(e, TextChunk)] == chunks  # observers see them too
    assert not any(isinstance(i, (LLMToken, LLMDone)) for i in items)  # consumed here
    assert stage.live_turns == 0


def test_stage_sends_end_only_chunk_when_nothing_is_left() -> None:
    async def main() -> list[Any]:
        ctx = _context()
        stage, outbox = _stage(ctx)
        first, second = ctx.turns.new(), ctx.turns.new()
        runner = asyncio.create_task(stage.run())
        # Everything already sent before LLMDone: the end has no text of its own.
        for token in _tokens(first.id, "All done here. "):
            await stage.inbox.put(token)
        await stage.inbox.put(LLMDone(turn_id=first.id, text="", tokens=3, finish_reason="stop"))
        # A reply with nothing speakable at all (and one with no tokens).
        for token in _tokens(second.id, "🎉 ```\ncode\n```"):
            await stage.inbox.put(token)
        await stage.inbox.put(LLMDone(turn_id=second.id, text="", tokens=2, finish_reason="stop"))
        await stage.inbox.put(LLMDone(turn_id=99, text="", tokens=0, finish_reason="length"))
        await stage.inbox.put(END)
        await asyncio.wait_for(runner, 5)
        return [i for i in await _drain(outbox) if isinstance(i, TextChunk)]

    chunks = asyncio.run(main())
    assert [(c.turn_id, c.text, c.index, c.last) for c in chunks] == [
        (1, "All done here.", 0, False),
        (1, "", 1, True),
        (2, "", 0, True),
        (99, "", 0, True),
    ]


def test_stage_interleaved_turns_keep_separate_state() -> None:
    async def main() -> list[TextChunk]:
        ctx = _context()
        stage, outbox = _stage(ctx)
        a, b = ctx.turns.new(), ctx.turns.new()
        runner = asyncio.create_task(stage.run())
        for ta, tb in itertools.zip_longest(_tokens(a.id, "Alpha one two three. More alpha words here."), _tokens(b.id, "Beta one, two three four.")):
            for token in (ta, tb):
                if token is not None:
                    await stage.inbox.put(token)
        for turn in (a, b):
            await stage.inbox.put(LLMDone(turn_id=turn.id, text="", tokens=1, finish_reason="stop"))
        await stage.inbox.put(END)
        await asyncio.wait_for(runner, 5)
        return [i for i in await _drain(outbox) if isinstance(i, TextChunk)]

    chunks = asyncio.run(main())
    by_turn = {t: [(c.text, c.index, c.last) for c in chunks if c.turn_id == t] for t in (1, 2)}
    assert by_turn[1] == [("Alpha one two three.", 0, False), ("More alpha words here.", 1, True)]
    assert by_turn[2] == [("Beta one, two three four.", 0, True)]


def test_cancelled_turn_produces_nothing_and_is_forgotten() -> None:
    async def main() -> tuple[list[TextChunk], list[int]]:
        ctx = _context()
        stage, outbox = _stage(ctx)
        ctx.turns.attach(stage.inbox)
        cancelled, kept = ctx.turns.new(), ctx.turns.new()
        runner = asyncio.create_task(stage.run())
        live: list[int] = []
        for token in _tokens(cancelled.id, "Let me think about this"):  # no boundary yet
            await stage.inbox.put(token)
        while len(stage.inbox):
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        live.append(stage.live_turns)  # the half-finished reply is held...
        assert ctx.cancel_turn(cancelled.id, "barge-in")
        live.append(stage.live_turns)  # ...and dropped on cancellation
        for token in _tokens(cancelled.id, " question. It is a good one, really."):
            await stage.inbox.put(token)
        await stage.inbox.put(LLMDone(turn_id=cancelled.id, text="", tokens=9, finish_reason="stop"))
        for token in _tokens(kept.id, "Okay, here we go now."):
            await stage.inbox.put(token)
        await stage.inbox.put(LLMDone(turn_id=kept.id, text="", tokens=5, finish_reason="stop"))
        await stage.inbox.put(END)
        await asyncio.wait_for(runner, 5)
        live.append(stage.live_turns)
        return [i for i in await _drain(outbox) if isinstance(i, TextChunk)], live

    chunks, live = asyncio.run(main())
    assert live == [1, 0, 0]
    assert all(c.turn_id == 2 for c in chunks)
    assert [(c.text, c.index, c.last) for c in chunks] == [("Okay, here we go now.", 0, True)]


def test_stage_bounds_unfinished_turns() -> None:
    async def main() -> ChunkerStage:
        ctx = _context()
        stage, _ = _stage(ctx)
        for _ in range(3 * ChunkerStage.max_live_turns):
            turn = ctx.turns.new()
            await stage.handle(LLMToken(turn_id=turn.id, text="never finished", index=0))
        return stage

    stage = asyncio.run(main())
    assert stage.live_turns == ChunkerStage.max_live_turns


def test_first_chunk_is_cut_at_first_max_words_without_a_boundary() -> None:
    seg = Segmenter(first_min_words=3, min_words=4, max_words=30, first_max_words=6)
    out: list[str] = []
    for token in "The boiling point of water is one hundred degrees Celsius at sea level. It boils lower up high.".split(" "):
        out += seg.push(token + " ")
    out += seg.flush()
    # cut at the phrase boundary before "is", not mid-phrase at six words
    assert out[0] == "The boiling point of water"
    assert out[1] == "is one hundred degrees Celsius at sea level."
    seg = Segmenter(first_min_words=3, first_max_words=5)
    out = [c for w in "The sun is approximately 93 million miles away.".split(" ") for c in seg.push(w + " ")]
    assert out[0] == "The sun is approximately"  # a number stays with what follows
    with pytest.raises(ValueError):
        Segmenter(first_min_words=4, first_max_words=3)
