"""Configuration: defaults load, overrides apply, bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from assistant.config import load_config
from assistant.errors import ConfigError


def test_defaults_load_and_hold_every_section() -> None:
    config = load_config()
    assert config.audio.input_rate == 16000
    assert config.vad.aggressiveness in range(4)
    assert config.llm.speculative.method == "auto"
    assert config.llm.system_prompt.startswith("You are")


def test_set_overrides_with_types() -> None:
    config = load_config(None, ["vad.silence_ms=600", "llm.temperature=0.5", "vad.silero.enabled=false"])
    assert config.vad.silence_ms == 600
    assert config.llm.temperature == 0.5
    assert config.vad.silero.enabled is False


def test_file_overrides_only_given_keys(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("vad:\n  aggressiveness: 3\nchunker:\n  first_min_words: 2\n")
    config = load_config(path)
    assert config.vad.aggressiveness == 3
    assert config.chunker.first_min_words == 2
    assert config.chunker.min_words == load_config().chunker.min_words


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("vad.silence=600", "unknown config key 'vad.silence'"),
        ("nope.x=1", "unknown config key 'nope'"),
        ("vad.silence_ms=soon", "vad.silence_ms: expected an integer, got 'soon'"),
        ("vad.aggressiveness=7", "vad.aggressiveness: 7 is out of range [0, 3]"),
        ("audio.frame_ms=25", "audio.frame_ms: expected one of [10, 20, 30], got 25"),
        ("llm.block_size=48", "llm.block_size: expected one of [16, 32, 64, 128, 256], got 48"),
        ("llm.weights=int8", "llm.weights: expected one of 'auto', 'int4', 'fp32', got 'int8'"),
        ("vad.silero.enabled=maybe", "vad.silero.enabled: expected true or false, got 'maybe'"),
        ("vad=3", "vad is a section"),
        ("vad.silence_ms", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_bad_file_names_the_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("asr:\n  beam: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'asr.beam' in .*bad.yaml"):
        load_config(path)
    path.write_text("asr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cross_key_rules() -> None:
    with pytest.raises(ConfigError, match="vad.pause_ms"):
        load_config(None, ["vad.pause_ms=900", "vad.silence_ms=500"])
    with pytest.raises(ConfigError, match="draft_model"):
        load_config(None, ["llm.speculative.method=draft_model"])


# ---- hostile or broken config files: one line each, never a traceback ----


def _refused(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_binary_config_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"vad:\n  silence_ms: \xff\xfe\x00\x81\n")
    assert "not UTF-8" in _refused(path)


def test_deeply_nested_config_is_refused_before_recursing(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 20_000 + "]" * 20_000)
    assert "nested deeper than" in _refused(path)


def test_yaml_alias_bomb_is_refused_without_expanding(tmp_path: Path) -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 2048
    assert "aliases" in _refused(path)


def test_endless_or_huge_config_file_is_refused(tmp_path: Path) -> None:
    assert "larger than" in _refused(Path("/dev/zero"))
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * (2 << 20) + "\n")
    assert "larger than" in _refused(path)


def test_config_path_that_is_a_folder(tmp_path: Path) -> None:
    assert "is a folder" in _refused(tmp_path)


def test_a_system_prompt_over_the_context_is_refused_at_load() -> None:
    huge = "word " * 200_000  # 1 MB (the report: 10 MB): vLLM refused it at the first turn ("maximum context length")
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"llm.system_prompt={huge}"])
    message = str(caught.value)
    assert message.startswith("llm.system_prompt:") and "llm.max_model_len" in message
    with pytest.raises(ConfigError, match="llm.history_tokens"):
        load_config(None, ["llm.history_tokens=4000"])
    assert load_config(None, ["llm.system_prompt=" + "word " * 200]).llm.system_prompt  # a normal prompt fits
