"""A vLLM general plugin (entry point ``vllm.general_plugins``): what this
project mends in vLLM, loaded by vLLM itself in every one of its processes
(the front end, the engine core, the workers, ``vllm serve``).

The compiled engine's start. vLLM saves the torch.compiled model (AOT) and
loads it at the next start, but on the CPU backend (compilation mode
DYNAMO_TRACE_ONCE, backend ``inductor``) the saved function is torch's
``BundledAOTAutogradSerializableCallable``, and vLLM 0.32 then calls
``finalize_loading()`` on it, a method only its own
``VllmSerializableFunction`` has: every start logged "Compiling model again
due to a load failure ... 'function' object has no attribute
'finalize_loading'" and compiled for ~80 s. Torch's bundled function is
complete when deserialized; there is nothing to finalize. With this the
cache loads: `serve` ready 125 -> 43-48 s on a 2-core AVX-512 Xeon
(README, Findings).

Imports nothing of the project: it runs in vLLM's processes.
"""

from __future__ import annotations

from typing import Any


def _nothing_to_finalize(self: Any, vllm_config: Any) -> None:
    """Torch's bundled AOT function is whole once deserialized."""


def register() -> None:
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable
    except ImportError:  # another torch: nothing to mend
        return
    if not hasattr(BundledAOTAutogradSerializableCallable, "finalize_loading"):
        BundledAOTAutogradSerializableCallable.finalize_loading = _nothing_to_finalize  # type: ignore[attr-defined]
