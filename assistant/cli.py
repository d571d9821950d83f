"""``voice-assistant``: the command line.

Commands:
  converse INPUT --output OUT.wav --report REPORT.json [--fast]
  mic [--input-device D] [--output-device D]
  bench --audio DIR_OR_FILES [--json OUT.json]
  devices
  serve [--host H] [--port P] [--token T]
  engine [--host H] [--port P] [--extra FLAGS]
  fleet [--engines N] [--servers M] [--port P] [--topology FILE]
  wyoming [--uri tcp://HOST:PORT] [--zeroconf [NAME]]
  client --url ws://HOST:PORT --input FILE [--output OUT.wav] [--token T]

Every user mistake (bad input, bad config, missing model package, no audio
device) ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import InputError, UserError


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML file overriding configs/default.yaml")
    common.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[], help="override one config key (repeatable)"
    )
    common.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks")

    parser = argparse.ArgumentParser(
        prog="voice-assistant", description="A real-time spoken assistant that runs offline on a CPU."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    converse = sub.add_parser(
        "converse", parents=[common], help="talk to the assistant through an audio file", description=(
            "Feed an audio file (any common format, rate, mono or stereo) to the assistant at real-time "
            "pace and write what it said, on the same timeline, plus a per-turn latency report."
        )
    )
    converse.add_argument("input", metavar="INPUT", help="audio file holding one or more spoken turns")
    converse.add_argument("--output", "-o", metavar="OUT.wav", help="reply audio on the input's timeline")
    converse.add_argument("--report", "-r", metavar="REPORT.json", help="per-turn transcripts, replies, milestones")
    converse.add_argument("--fast", action="store_true", help="feed the input as fast as possible")

    mic = sub.add_parser(
        "mic", parents=[common], help="live conversation through the microphone and speaker"
    )
    mic.add_argument("--input-device", metavar="DEVICE", help="index or name (see `devices`)")
    mic.add_argument("--output-device", metavar="DEVICE", help="index or name (see `devices`)")
    mic.add_argument("--report", "-r", metavar="REPORT.json", help="write the turns on exit")
    mic.add_argument("--max-seconds", type=float, default=None, help="stop after this long")

    kiosk = sub.add_parser(
        "kiosk", parents=[common], help="unattended microphone and speaker: wake word, systemd, metrics",
        description=(
            "What `mic` does, for a box left alone: it sleeps until it hears its wake word (kiosk.wake_word), "
            "greets at start-up, tells systemd it is ready and alive (Type=notify, WatchdogSec), reopens lost "
            "audio devices, and serves /metrics and /healthz on kiosk.metrics_port (deploy/voice-kiosk.service)."
        ),
    )
    kiosk.add_argument("--input-device", metavar="DEVICE", help="index or name (see `devices`)")
    kiosk.add_argument("--output-device", metavar="DEVICE", help="index or name (see `devices`)")
    kiosk.add_argument("--max-seconds", type=float, default=None, help="stop after this long")

    bench = sub.add_parser(
        "bench", parents=[common], help="per-stage latency over spoken questions (p50/p95/max)"
    )
    bench.add_argument("--audio", nargs="+", required=True, metavar="DIR_OR_FILE", help="utterances to stream")
    bench.add_argument("--json", metavar="OUT.json", help="write every turn and the summary")
    bench.add_argument("--plot", metavar="OUT.png", help="draw a timeline of each turn")
    bench.add_argument("--no-baseline", action="store_true", help="skip the naive sequential baseline")

    scen = sub.add_parser(
        "scenarios", parents=[common], help="turn-taking scenarios: barge-in, echo, coughs, pauses",
        description=(
            "Play the scripted scenarios (audio_assets/scenarios) through the full pipeline in a simulated "
            "room, with and without the assistant's own voice echoing into the microphone, and report "
            "barge-in stop times, self-interruptions, false barge-ins and turn counts."
        ),
    )
    scen.add_argument("--dir", metavar="DIR", help="scenario set (default: audio_assets/scenarios)")
    scen.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios")
    scen.add_argument("--echo", choices=["on", "off", "both"], default="both", help="echo in the room")
    scen.add_argument(
        "--echo-delay-ms", type=float, nargs="+", default=[30.0, 75.0, 120.0],
        help="speaker-to-microphone delays; each echo run is repeated at each (default: 30 75 120)",
    )
    scen.add_argument("--echo-gain-db", type=float, default=-10.0, help="echo level relative to the speaker")
    scen.add_argument("--no-cancel", action="store_true", help="leave the echo canceller off (to see why it is there)")
    scen.add_argument(
        "--fresh-canceller",
        action="store_true",
        help="start each scenario with a canceller that has heard nothing yet (default: it has heard 3 s of the "
        "assistant's voice in the room, as on a kiosk that has been running)",
    )
    scen.add_argument("--json", metavar="OUT.json", help="write every run and the summary")

    sub.add_parser("devices", parents=[common], help="list audio devices")

    serve = sub.add_parser(
        "serve", parents=[common], help="websocket server and browser client (docs/protocol.md)", description=(
            "Load the models once and serve the browser client (GET /) and the websocket endpoint /ws on one "
            "port; every connection is a session. Stops gracefully on SIGTERM or Ctrl+C."
        )
    )
    serve.add_argument("--host", metavar="HOST", help="address to listen on (server.host; 0.0.0.0 = all)")
    serve.add_argument("--port", metavar="PORT", type=int, help="port (server.port; 0 = any free port)")
    serve.add_argument("--token", metavar="TOKEN", help="require this bearer token (else VOICE_ASSISTANT_TOKEN, "
                       "else server.auth_token)")

    engine = sub.add_parser(
        "engine", parents=[common], help="run the language model as a vLLM server for `serve --set llm.engine=remote`",
        description=(
            "Start vLLM's OpenAI-compatible server on the configured model with this project's engine settings "
            "(weights, dtype, eager mode, KV cache, CPU threads, speculation), print its URL once it answers, "
            "and run until SIGTERM or Ctrl+C. Voice servers on this or other machines then use it with "
            "llm.engine=remote and llm.url=URL (docs/deploy.md)."
        ),
    )
    engine.add_argument("--host", metavar="HOST", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    engine.add_argument("--port", metavar="PORT", type=int, help="port (default 8000)")
    engine.add_argument("--extra", metavar="FLAGS", help="further `vllm serve` flags, quoted as one argument "
                        "(e.g. \"--tensor-parallel-size 2\")")
    engine.add_argument("--ready-timeout", type=float, default=600.0, metavar="S",
                        help="seconds to wait for the server to answer (default 600)")

    fleet = sub.add_parser(
        "fleet", parents=[common], help="engine replicas, vLLM's router, voice servers and HAProxy, started together",
        description=(
            "Start N vLLM engine replicas, vllm-router in front of them, M voice servers on the router and "
            "HAProxy in front of those (docs/deploy.md section 4), wait until each answers, print the one ws:// "
            "URL, and stop everything on SIGTERM or Ctrl+C. On one machine the parts take free loopback ports; "
            "--topology gives their addresses on several hosts."
        ),
    )
    fleet.add_argument("--engines", type=int, default=2, metavar="N", help="engine replicas (default 2)")
    fleet.add_argument("--servers", type=int, default=2, metavar="M", help="voice servers (default 2)")
    fleet.add_argument("--host", metavar="HOST", help="the load balancer's address (default 127.0.0.1)")
    fleet.add_argument("--port", type=int, metavar="PORT", help="the load balancer's port (default server.port)")
    fleet.add_argument("--policy", default="consistent_hash", choices=["consistent_hash", "round_robin", "random",
                       "power_of_two", "cache_aware"], help="vllm-router's policy (default consistent_hash: a "
                       "session stays on the replica that caches its prompt, keyed on X-Session-ID)")
    fleet.add_argument("--topology", metavar="FILE", help="YAML file of the parts' addresses on several hosts "
                       "(examples/fleet.yaml); overrides --engines, --servers, --host, --port, --policy")
    fleet.add_argument("--only", nargs="+", choices=["engines", "router", "servers", "balancer"], metavar="KIND",
                       help="start only these kinds of parts here (engines router servers balancer); wait for "
                       "the others at their addresses")
    fleet.add_argument("--logs", metavar="DIR", help="where each part's log goes (default: a new temporary folder)")
    fleet.add_argument("--ready-timeout", type=float, default=600.0, metavar="S",
                       help="seconds each kind of part may take to answer (default 600)")

    wyoming = sub.add_parser(
        "wyoming", parents=[common], help="Wyoming server for Home Assistant: speech-to-text, text-to-speech, "
        "conversation agent", description=(
            "Load the models once and serve the Wyoming protocol (Home Assistant's voice services): "
            "transcribe, synthesize and answer a transcript with the language model, each streaming. "
            "Add it in Home Assistant as a Wyoming Protocol integration (host and port)."
        ),
    )
    wyoming.add_argument("--uri", default=None, metavar="URI",
                         help="tcp://HOST:PORT or unix://PATH (default wyoming.uri: tcp://127.0.0.1:10300, this "
                         "machine only; the protocol has no authentication, see wyoming.allowed_clients)")
    wyoming.add_argument("--zeroconf", nargs="?", const="", default=None, metavar="NAME",
                         help="announce _wyoming._tcp.local. for Home Assistant's discovery (needs the zeroconf "
                         "package); NAME defaults to the MAC address")

    remote = sub.add_parser(
        "client", parents=[common], help="talk to a running `serve` through an audio file", description=(
            "Stream an audio file to a voice-assistant server at real-time pace, print the transcripts and "
            "replies as they arrive, and save the reply audio on the input's timeline."
        )
    )
    remote.add_argument("--url", required=True, metavar="URL", help="ws://HOST:PORT (or the http:// URL serve printed)")
    remote.add_argument("--input", "-i", required=True, metavar="FILE", help="audio file holding one or more turns")
    remote.add_argument("--output", "-o", metavar="OUT.wav", help="reply audio on the input's timeline")
    remote.add_argument("--token", metavar="TOKEN", help="bearer token (else VOICE_ASSISTANT_TOKEN)")
    remote.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the last reply (default 120)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if not debug:
        warnings.filterwarnings("ignore")  # library deprecation chatter
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.ERROR,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "devices":
            from audio.devices import list_devices

            print(list_devices())
            return 0
        from .config import load_config

        config = load_config(args.config, args.set)
        if not debug:
            for name in ("assistant", "pipeline"):
                logging.getLogger(name).setLevel(config.log_level.upper())
        if args.command == "converse":
            return converse(args, config)
        if args.command == "mic":
            return mic(args, config)
        if args.command == "kiosk":
            from .kiosk import kiosk

            return kiosk(args, config)
        if args.command == "bench":
            from .evaluation.bench import bench

            return bench(args, config)
        if args.command == "serve":
            from .server.serve import serve

            return serve(args, config)
        if args.command == "fleet":
            from .fleet import fleet_command

            return fleet_command(args, config)
        if args.command == "wyoming":
            from .server.wyoming import wyoming_command

            return wyoming_command(args, config)
        if args.command == "engine":
            from .engine.server import engine_command

            return engine_command(args, config)
        if args.command == "client":
            from .client import client

            return client(args, config.audio.max_input_seconds)
        if args.command == "scenarios":
            from .evaluation.scenarios import scenarios_command

            return scenarios_command(args, config)
    except UserError as exc:
        _say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say("stopped")
        return 130
    except Exception as exc:  # a bug: one line unless --debug
        if debug:
            raise
        _say(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)")
        return 1
    return 0


# --------------------------------------------------------------------------
# converse
# --------------------------------------------------------------------------


def _count_turns(pcm: Any, config: Any) -> int:
    """The VAD alone over the input (no other model): how many turns it holds."""
    from audio.framing import file_source
    from pipeline.vad import SileroOpinion, count_turns

    from .components import vad_settings

    silero = SileroOpinion().max_probability if config.vad.silero.enabled else None
    frames = file_source(pcm, config.audio.input_rate, config.audio.frame_ms, realtime=False)
    return asyncio.run(count_turns(frames, vad_settings(config, silero is not None), silero))


OUTPUTS = {"output": "reply audio", "report": "report"}  # the --flags a command writes, and what they hold


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse an output that cannot be written, before minutes of loading and conversing."""
    for flag, what in OUTPUTS.items():
        value = getattr(args, flag, None)
        if not value:
            continue
        path = Path(value)
        if path.is_dir():
            raise InputError(f"--{flag}: cannot write the {what}: {path} is a folder")
        if not path.parent.exists():
            raise InputError(f"--{flag}: folder {path.parent} does not exist")
        if not path.parent.is_dir():
            raise InputError(f"--{flag}: cannot write the {what}: {path.parent} is not a folder")
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            raise InputError(f"--{flag}: cannot write the {what} to {path}: permission denied")


@contextlib.contextmanager
def _writing(flag: str, path: str) -> Iterator[None]:
    """An OSError while writing an output (a full disk...) as one sentence."""
    try:
        yield
    except OSError as exc:
        raise InputError(f"cannot write the {OUTPUTS[flag]} to {path}: {exc.strerror or exc}") from None


def converse(args: argparse.Namespace, config: Any) -> int:
    from audio.files import decode_file

    _check_outputs(args)
    pcm = decode_file(args.input, config.audio.input_rate, config.audio.max_input_seconds)
    _say(f"input: {args.input}, {len(pcm) / config.audio.input_rate:.1f} s")
    if _count_turns(pcm, config) == 0:
        _say("no speech found in the input: nothing to answer")
        if args.output:
            from audio.files import write_wav

            silent = np.zeros(len(pcm) * config.audio.output_rate // config.audio.input_rate, np.int16)
            with _writing("output", args.output):
                write_wav(args.output, silent, config.audio.output_rate)
        if args.report:
            _write_report(args.report, args.input, config, None, [], fast=args.fast)
        return 0
    from .models import load_models

    models = load_models(config)
    try:
        return asyncio.run(_converse(args, config, models, pcm))
    finally:
        models.close()


async def _converse(args: argparse.Namespace, config: Any, models: Any, pcm: Any) -> int:
    from pipeline.playback import TimelineOutput

    from audio.files import write_wav
    from audio.framing import file_source

    from .session import Session

    output = TimelineOutput(config.audio.output_rate, config.audio.input_rate, realtime=not args.fast)
    await _warm_up(models)
    session = Session(models, config, output, realtime=not args.fast)
    session.report.listeners.append(_print_turn(session))
    _say("conversing" + (" (fast)" if args.fast else " (real-time pace)") + "...")
    started = time.monotonic()
    source = file_source(pcm, config.audio.input_rate, config.audio.frame_ms, realtime=not args.fast, start=session.origin)
    await session.run(source)
    turns = session.report.to_json()
    _say(f"done in {time.monotonic() - started:.1f} s: {len(turns)} turn(s)")
    if args.output:
        duration = len(pcm) * config.audio.output_rate // config.audio.input_rate
        with _writing("output", args.output):
            write_wav(args.output, output.render(duration), config.audio.output_rate)
        _say(f"wrote {args.output}")
    if args.report:
        _write_report(args.report, args.input, config, session, turns, fast=args.fast)
        _say(f"wrote {args.report}")
    return 0


async def _warm_up(models: Any) -> None:
    started = time.monotonic()
    _say("warming up...")
    await models.warm_up()
    _say(f"warm in {time.monotonic() - started:.1f} s")


def _print_turn(session: Any):
    def show(record: Any) -> None:
        data = session.report.turn_json(record)
        if record.noise:
            return
        v2v = data["voice_to_voice_ms"]
        _say(f"  you: {data['transcript']}")
        if data["reply"]:
            _say(f"  assistant: {data['reply']}")
        if v2v is not None:
            _say(f"  voice-to-voice: {v2v:.0f} ms")
        if record.status == "interrupted":
            _say(f"  (interrupted by you after: \"{data['heard_text']}\"; stopped in {data['barge_in_stop_ms']:.0f} ms)")
        elif record.status == "cancelled":
            _say(f"  (turn cancelled: {record.cancel_reason})")

    return show


def _write_report(path: str, input_path: str, config: Any, session: Any, turns: list[dict[str, Any]], fast: bool) -> None:
    from .engine.local import resolve_speculation, resolve_weights_kind

    report = {
        "input": str(input_path),
        "pace": "fast" if fast else "realtime",
        "models": {
            "asr": "whisper tiny.en (CTranslate2, int8)",
            "llm": (
                f"SmolLM2-135M-Instruct on vLLM ({resolve_weights_kind(config)} weights, "
                f"speculative decoding: {resolve_speculation(config)})"
                if config.llm.engine == "local"
                else f"the vLLM server at {config.llm.url} (model {session.models.llm.model_name})"
            ),
            "tts": "piper en_US-joe-medium",
        },
        "milestones_origin": "ms since the start of the input",
        "turns": turns,
    }
    with _writing("report", path):
        Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# mic
# --------------------------------------------------------------------------


def mic(args: argparse.Namespace, config: Any) -> int:
    from audio.devices import resolve_device

    _check_outputs(args)
    in_dev = resolve_device(args.input_device, "input")
    out_dev = resolve_device(args.output_device, "output")
    from .models import load_models

    models = load_models(config)
    try:
        return asyncio.run(_mic(args, config, models, in_dev, out_dev))
    finally:
        models.close()


async def _mic(args: argparse.Namespace, config: Any, models: Any, in_dev: Any, out_dev: Any) -> int:
    from .live import LiveAudio, echo_canceller, stop_event
    from .session import Session

    await _warm_up(models)
    canceller = echo_canceller(config)  # a loudspeaker and a microphone in one room
    live = LiveAudio(config, in_dev, out_dev, echo_canceller=canceller)
    session = Session(models, config, live.output, echo_canceller=canceller)
    session.report.listeners.append(_print_turn(session))
    stop = stop_event(args.max_seconds)
    with live:
        _say("listening (Ctrl+C to stop)...")
        await session.run(live.frames(stop))
    if args.report:
        _write_report(args.report, "microphone", config, session, session.report.to_json(), fast=False)
    _say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
