"""Configuration: typed sections, loaded from YAML, validated at load.

``configs/default.yaml`` is the single source of every default (with a
comment per key). A user file given with ``--config`` and ``--set key=value``
overrides are merged over it. Every key is checked against the dataclasses
below: an unknown key, a missing key or a value of the wrong type is an error
that names the key (``vad.silence_ms: expected an integer, got 'soon'``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


@dataclass
class AudioConfig:
    input_rate: int
    frame_ms: int
    output_rate: int
    max_input_seconds: float


@dataclass
class SileroConfig:
    enabled: bool
    threshold: float


@dataclass
class SmartTurnConfig:
    enabled: bool
    threshold: float
    complete_silence_ms: int
    threads: int


@dataclass
class VADConfig:
    aggressiveness: int
    min_speech_ms: int
    silence_ms: int
    complete_silence_ms: int
    incomplete_silence_ms: int
    pause_ms: int
    preroll_ms: int
    max_utterance_s: float
    silero: SileroConfig
    smart_turn: SmartTurnConfig


@dataclass
class ASRConfig:
    model: str
    compute_type: str
    threads: int
    partial_interval_ms: int
    min_partial_audio_ms: int
    beam_size: int
    language: str
    window_s: float
    final_at_pause: bool


@dataclass
class SpeculativeConfig:
    method: Literal["auto", "none", "ngram", "draft_model"]
    num_speculative_tokens: int
    prompt_lookup_min: int
    prompt_lookup_max: int
    draft_model: str | None


@dataclass
class LLMConfig:
    engine: Literal["local", "remote"]
    url: str
    api_key: str | None
    model_name: str | None
    connect_timeout_s: float
    read_timeout_s: float
    error_phrase: str
    model: str
    weights: Literal["auto", "int4", "fp32"]
    dtype: str
    cache_dir: str
    max_model_len: int
    kv_cache_gib: float
    block_size: int
    enforce_eager: bool
    cpu_threads: int
    nice: int
    preload: Literal["auto", "none"]
    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    history_tokens: int
    system_prompt: str
    speculative: SpeculativeConfig
    tool_parser: Literal["none", "hermes"] = "none"


@dataclass
class ChunkerConfig:
    first_min_words: int
    first_max_words: int
    min_words: int
    max_words: int


@dataclass
class TTSConfig:
    voice: str
    length_scale: float
    threads: int


@dataclass
class BudgetPolicies:
    end_of_speech: Literal["log"]
    asr_final: Literal["log", "commit_partial"]
    llm_first_token: Literal["log", "acknowledge"]
    tool_call: Literal["log", "acknowledge"]
    first_chunk: Literal["log", "acknowledge"]
    tts_first_audio: Literal["log"]
    voice_to_voice: Literal["log"]
    turn: Literal["log", "cancel"]


@dataclass
class BudgetsConfig:
    end_of_speech_ms: float
    asr_final_ms: float
    llm_first_token_ms: float
    tool_call_ms: float
    first_chunk_ms: float
    tts_first_audio_ms: float
    voice_to_voice_ms: float
    turn_ms: float
    policies: BudgetPolicies
    acknowledgement: str
    apology: str


@dataclass
class BargeInConfig:
    enabled: bool
    min_speech_ms: int
    silero_threshold: float
    min_rms_dbfs: float


@dataclass
class EchoConfig:
    cancel: Literal["auto", "on", "off"]
    tail_ms: int
    delay_ms: int


@dataclass
class ServerConfig:
    host: str
    port: int
    auth_token: str | None
    allowed_origins: list[str]
    max_sessions: int
    load_threshold: float
    load_window_s: float
    max_message_bytes: int
    idle_timeout_s: float
    ping_interval_s: float
    ping_timeout_s: float
    max_input_rate: float
    max_messages_per_s: float
    message_burst: int
    jitter_buffer_ms: int
    shutdown_grace_s: float


@dataclass
class WyomingConfig:
    """`voice-assistant wyoming`: the protocol has no authentication, so who may connect is said here."""

    uri: str
    allowed_clients: list[str]
    max_connections: int


@dataclass
class HttpToolConfig:
    url: str
    method: Literal["GET", "POST"] = "POST"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ToolConfig:
    """A tool declared in the config: an HTTP endpoint or a command (argv, no shell)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    keywords: list[str] = field(default_factory=list)
    http: HttpToolConfig | None = None
    command: list[str] | None = None
    timeout_s: float | None = None


@dataclass
class MCPServerConfig:
    """An MCP server whose tools the assistant may call: a command (stdio) or a URL (streamable HTTP)."""

    command: list[str] | None = None
    url: str | None = None
    keywords: dict[str, list[str]] = field(default_factory=dict)  # tool name -> its keywords
    timeout_s: float | None = None


@dataclass
class ToolsConfig:
    choice: Literal["auto", "required", "none"]
    preselect: bool
    timeout_s: float
    max_rounds: int
    apology: str
    declared: list[ToolConfig]
    mcp: list[MCPServerConfig]


@dataclass
class KioskConfig:
    wake_word: str
    wake_threshold: float | None
    idle_s: float
    greeting: str
    earcon: str
    metrics_host: str
    metrics_port: int


@dataclass
class Config:
    audio: AudioConfig
    vad: VADConfig
    asr: ASRConfig
    llm: LLMConfig
    chunker: ChunkerConfig
    tts: TTSConfig
    budgets: BudgetsConfig
    barge_in: BargeInConfig
    echo: EchoConfig
    server: ServerConfig
    wyoming: WyomingConfig
    kiosk: KioskConfig
    tools: ToolsConfig
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

_CHECKS: dict[str, tuple[Any, Any]] = {
    "audio.input_rate": (16000, 16000),
    "audio.frame_ms": ({10, 20, 30}, None),
    "audio.output_rate": (8000, 192000),
    "audio.max_input_seconds": (1, 3600),
    "vad.aggressiveness": (0, 3),
    "vad.min_speech_ms": (0, 5000),
    "vad.silence_ms": (50, 10000),
    "vad.complete_silence_ms": (50, 10000),
    "vad.incomplete_silence_ms": (50, 10000),
    "vad.pause_ms": (0, 10000),
    "vad.preroll_ms": (0, 2000),
    "vad.silero.threshold": (0.0, 1.0),
    "vad.smart_turn.threshold": (0.0, 1.0),
    "vad.smart_turn.complete_silence_ms": (50, 10000),
    "vad.smart_turn.threads": (1, 64),
    "asr.threads": (1, 64),
    "asr.partial_interval_ms": (100, 10000),
    "asr.beam_size": (1, 10),
    "asr.window_s": (5.0, 30.0),
    "llm.max_tokens": (1, 4096),
    "llm.min_tokens": (0, 4096),
    "llm.connect_timeout_s": (0.1, 60.0),
    "llm.read_timeout_s": (1.0, 600.0),
    "llm.nice": (0, 19),
    "llm.block_size": ({16, 32, 64, 128, 256}, None),
    "llm.temperature": (0.0, 2.0),
    "llm.top_p": (0.0, 1.0),
    "llm.speculative.num_speculative_tokens": (1, 16),
    "chunker.first_min_words": (1, 50),
    "chunker.first_max_words": (1, 200),
    "chunker.min_words": (1, 100),
    "chunker.max_words": (2, 200),
    "tts.length_scale": (0.25, 4.0),
    "budgets.end_of_speech_ms": (0, 60000),
    "budgets.asr_final_ms": (0, 60000),
    "budgets.llm_first_token_ms": (0, 60000),
    "budgets.tool_call_ms": (0, 60000),
    "tools.timeout_s": (0.1, 300.0),
    "tools.max_rounds": (1, 10),
    "budgets.first_chunk_ms": (0, 60000),
    "budgets.tts_first_audio_ms": (0, 60000),
    "budgets.voice_to_voice_ms": (0, 60000),
    "budgets.turn_ms": (0, 600000),
    "barge_in.min_speech_ms": (20, 5000),
    "barge_in.silero_threshold": (0.0, 1.0),
    "barge_in.min_rms_dbfs": (-90.0, 0.0),
    "echo.tail_ms": (10, 1000),
    "echo.delay_ms": (0, 1000),
    "server.port": (0, 65535),
    "server.max_sessions": (1, 1000),
    "server.max_message_bytes": (1024, 16 * 1024 * 1024),
    "server.idle_timeout_s": (1, 86400),
    "server.ping_interval_s": (1, 3600),
    "server.ping_timeout_s": (1, 3600),
    "server.max_input_rate": (1.0, 100.0),
    "server.max_messages_per_s": (10.0, 100000.0),
    "server.message_burst": (10, 1000000),
    "server.jitter_buffer_ms": (0, 5000),
    "server.shutdown_grace_s": (0, 60),
    "server.load_threshold": (0.1, 10.0),
    "server.load_window_s": (1, 3600),
    "wyoming.max_connections": (1, 1000),
    "kiosk.idle_s": (1.0, 3600.0),
    "kiosk.metrics_port": (0, 65535),
}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the file at ``path``, then ``key=value`` overrides."""
    data = _read_yaml(DEFAULT_CONFIG)
    if path is not None:
        _merge(data, _read_yaml(Path(path)), prefix="", source=str(path))
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected key=value, e.g. vad.silence_ms=600")
        _set_dotted(data, key.strip(), _parse_value(raw))
    config = _build(Config, data, prefix="")
    _check_ranges(config)
    _check_tools(config.tools)
    _check_clients(config.wyoming.allowed_clients)
    return config


def _check_clients(clients: list[str]) -> None:
    """Each allowed client is an address or a network (``192.168.1.20``, ``10.0.0.0/24``)."""
    import ipaddress

    for i, client in enumerate(clients):
        try:
            ipaddress.ip_network(str(client), strict=False)
        except ValueError:
            raise ConfigError(f"wyoming.allowed_clients[{i}]: {client!r} is not an IP address or network "
                              "(e.g. 192.168.1.20 or 192.168.1.0/24)") from None


_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _check_tools(tools: ToolsConfig) -> None:
    """Each declared tool is one thing (HTTP or a command) with a usable name and
    schema; each MCP server is reached one way."""
    seen: set[str] = set()
    for i, tool in enumerate(tools.declared):
        where = f"tools.declared[{i}]"
        if not _TOOL_NAME.match(tool.name):
            raise ConfigError(f"{where}.name: {tool.name!r} is not a tool name (letters, digits, _ and -, up to 64)")
        if tool.name in seen:
            raise ConfigError(f"{where}.name: {tool.name!r} is declared twice")
        seen.add(tool.name)
        if (tool.http is None) == (tool.command is None):
            raise ConfigError(f"{where}: give either http or command")
        if tool.command is not None and (not tool.command or not all(isinstance(a, str) for a in tool.command)):
            raise ConfigError(f"{where}.command: expected a list of strings (argv, no shell)")
        if tool.http is not None and urlsplit(tool.http.url).scheme not in ("http", "https"):
            raise ConfigError(f"{where}.http.url: expected an http:// or https:// URL, got {tool.http.url!r}")
        if tool.parameters.get("type", "object") != "object":
            raise ConfigError(f"{where}.parameters: the arguments' schema must be of type object")
        if tool.timeout_s is not None and not 0.1 <= tool.timeout_s <= 300:
            raise ConfigError(f"{where}.timeout_s: expected 0.1-300, got {tool.timeout_s}")
    for i, server in enumerate(tools.mcp):
        where = f"tools.mcp[{i}]"
        if (server.command is None) == (server.url is None):
            raise ConfigError(f"{where}: give either command (stdio) or url (streamable HTTP)")
        if server.command is not None and not server.command:
            raise ConfigError(f"{where}.command: expected a list of strings (argv, no shell)")
        if server.url is not None and urlsplit(server.url).scheme not in ("http", "https"):
            raise ConfigError(f"{where}.url: expected an http:// or https:// URL, got {server.url!r}")


# A config is a few kilobytes of sections and scalars: anything much bigger,
# deeper, or built from aliases is a mistake or an attack (a YAML alias bomb
# expands a kilobyte into gigabytes).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases and deep nesting as it composes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config file", mark)
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels", mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"not a valid config file: {path} is a folder") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"not a valid config file: {path} is larger than {MAX_CONFIG_BYTES >> 10} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not a valid config file: {path} is not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}".replace("\n", " ")) from None
    except RecursionError:
        raise ConfigError(f"not a valid config file: {path} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _merge(base: dict[str, Any], extra: dict[str, Any], prefix: str, source: str) -> None:
    for key, value in extra.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {dotted!r} in {source}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section (mapping) in {source}")
            _merge(base[key], value, f"{dotted}.", source)
        else:
            base[key] = value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown config key {dotted!r} (from --set {key}=...)")
        if i == len(parts) - 1:
            if isinstance(node[part], dict):
                raise ConfigError(f"{dotted} is a section; set one of its keys")
            node[part] = value
        else:
            node = node[part]


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a section (mapping)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ConfigError(f"missing config key {dotted!r}")
        values[name] = _coerce(hints[name], data[name], dotted)
    return cls(**values)


def _coerce(tp: Any, value: Any, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{dotted}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, dotted)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: expected a mapping, got {value!r}")
        key_type, item_type = typing.get_args(tp) or (Any, Any)
        return {str(k): v if item_type is Any else _coerce(item_type, v, f"{dotted}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{dotted}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [value if inner is Any else _coerce(inner, item, f"{dotted}[{i}]") for i, item in enumerate(value)]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{dotted}: expected one of {choices}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{dotted}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{dotted}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{dotted}: unsupported type {tp!r}")  # pragma: no cover


def _check_ranges(config: Config) -> None:
    for dotted, (low, high) in _CHECKS.items():
        value: Any = config
        for part in dotted.split("."):
            value = getattr(value, part)
        if isinstance(low, set):
            if value not in low:
                raise ConfigError(f"{dotted}: expected one of {sorted(low)}, got {value!r}")
        elif not low <= value <= high:
            raise ConfigError(f"{dotted}: {value!r} is out of range [{low}, {high}]")
    if config.chunker.first_min_words > config.chunker.max_words:
        raise ConfigError("chunker.first_min_words: must not exceed chunker.max_words")
    if config.chunker.first_max_words < config.chunker.first_min_words:
        raise ConfigError("chunker.first_max_words: must be at least chunker.first_min_words")
    for key in ("silence_ms", "complete_silence_ms", "incomplete_silence_ms"):
        if config.vad.pause_ms >= getattr(config.vad, key):
            raise ConfigError(f"vad.pause_ms: must be shorter than vad.{key}")
    if config.llm.min_tokens > config.llm.max_tokens:
        raise ConfigError("llm.min_tokens: must not exceed llm.max_tokens")
    if config.llm.engine == "remote":
        url = urlsplit(config.llm.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"llm.url: expected an http(s) URL such as http://127.0.0.1:8000/v1, got {config.llm.url!r}")
    if config.llm.speculative.method == "draft_model" and not config.llm.speculative.draft_model:
        raise ConfigError("llm.speculative.draft_model: required when llm.speculative.method is draft_model")
    _check_context_budget(config.llm)


# No tokenizer is loaded to validate a config: a prompt's tokens are
# estimated as one per 2 bytes of UTF-8, an over-estimate for English and
# other Latin-script text (~4 characters a token), so such a prompt that
# passes here fits. A script with more tokens than bytes / 2 may still pass,
# and vLLM then says so at the first turn.
BYTES_PER_TOKEN_AT_LEAST = 2


def _check_context_budget(llm: LLMConfig) -> None:
    """System prompt + history + reply must fit ``llm.max_model_len``: vLLM refused it at the first turn."""
    prompt = len(llm.system_prompt.encode("utf-8")) // BYTES_PER_TOKEN_AT_LEAST
    room = llm.max_model_len - llm.history_tokens - llm.max_tokens
    if room <= 0:
        raise ConfigError(
            f"llm.history_tokens: {llm.history_tokens} + llm.max_tokens {llm.max_tokens} leave no room for the "
            f"prompt in llm.max_model_len ({llm.max_model_len})"
        )
    if prompt > room:
        raise ConfigError(
            f"llm.system_prompt: about {prompt} tokens (counted as one per {BYTES_PER_TOKEN_AT_LEAST} bytes) "
            f"with llm.history_tokens ({llm.history_tokens}) and llm.max_tokens ({llm.max_tokens}) exceed "
            f"llm.max_model_len ({llm.max_model_len})"
        )
