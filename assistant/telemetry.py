"""Prometheus metrics for an operator: ``/metrics`` on `serve` and the kiosk.

One :class:`Telemetry` per process holds the series (its own registry, so
tests and several servers in one process never share counters). Sessions
are observed from what they already produce: every closed turn's record
(the report's latencies, from the one clock table in pipeline/metrics.py)
and the bus events for barge-ins, budget overruns and errors; nothing in
the pipeline knows about Prometheus.

Series (seconds, as Prometheus prefers; the report's milliseconds / 1000):

=============================================  =========  ======================================
voice_assistant_voice_to_voice_seconds          histogram  last voiced frame -> first reply sample
voice_assistant_client_voice_to_voice_seconds   histogram  the same, measured by the client (browser)
voice_assistant_stage_latency_seconds{stage}    histogram  each span of the report (asr_final, ...)
voice_assistant_turns_total{status}             counter    completed, interrupted, cancelled
voice_assistant_barge_ins_total                 counter    replies stopped by the user
voice_assistant_barge_ins_rejected_total        counter    onsets over a reply that did not interrupt
voice_assistant_budget_overruns_total{stage}    counter    a stage over its latency budget
voice_assistant_errors_total{kind}              counter    stage failures (kind = the stage)
voice_assistant_wake_detections_total           counter    wake words heard (kiosk)
voice_assistant_sessions                        gauge      open sessions
voice_assistant_engine_up                       gauge      1 while the language model answers
voice_assistant_models_loaded                   gauge      1 once every model is loaded
voice_assistant_audio_device_open               gauge      1 while the microphone delivers (kiosk)
voice_assistant_asyncio_tasks                   gauge      tasks alive on the event loop
voice_assistant_threads                         gauge      OS threads of the process
process_resident_memory_bytes, process_open_fds  gauge      prometheus-client's process collector
=============================================  =========  ======================================

The last three are what a leak shows first over weeks (scripts/soak.py
reads them each minute).

p95 voice to voice over the last 5 minutes, in PromQL::

    histogram_quantile(0.95, sum by (le) (rate(voice_assistant_voice_to_voice_seconds_bucket[5m])))
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pipeline.frames import BudgetExceeded, Event, ReplyInterrupted, StageError

log = logging.getLogger("assistant.telemetry")

# Voice-to-voice and stage spans: 50 ms .. 10 s.
_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0)


# ---- reading a scrape (vLLM's /metrics, ours) -----------------------------

Sample = tuple[str, dict[str, str], float]


def parse(text: str) -> list[Sample]:
    """A Prometheus exposition as ``(name, labels, value)`` per sample."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), float(s.value)) for f in text_string_to_metric_families(text) for s in f.samples]


def scrape(url: str, api_key: str | None = None, timeout_s: float = 5.0) -> list[Sample]:
    """Read a Prometheus endpoint (``api_key``: vLLM's bearer token)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return parse(httpx.get(url, headers=headers, timeout=timeout_s).raise_for_status().text)


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of a series over the samples whose labels match ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def os_threads() -> float:
    """Threads of this process as the kernel counts them (native ones too:
    onnxruntime, CTranslate2, PortAudio); Python's count where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(threading.active_count())


class Telemetry:
    """The process's Prometheus series, fed by sessions and the process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.voice_to_voice = Histogram(
            "voice_assistant_voice_to_voice_seconds",
            "From the user's last voiced frame to the reply's first sample.",
            buckets=_BUCKETS,
            registry=r,
        )
        self.client_voice_to_voice = Histogram(
            "voice_assistant_client_voice_to_voice_seconds",
            "Voice to voice as clients measured it: their microphone to their speaker (playback.heard).",
            buckets=_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "voice_assistant_stage_latency_seconds",
            "Each span of a turn (pipeline/metrics.py), per stage.",
            ["stage"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.turns = Counter("voice_assistant_turns", "Turns closed, by status.", ["status"], registry=r)
        self.barge_ins = Counter("voice_assistant_barge_ins", "Replies stopped by the user talking.", registry=r)
        self.barge_ins_rejected = Counter(
            "voice_assistant_barge_ins_rejected", "Onsets over a reply that did not interrupt it.", registry=r
        )
        self.budget_overruns = Counter(
            "voice_assistant_budget_overruns", "A stage over its latency budget.", ["stage"], registry=r
        )
        self.errors = Counter("voice_assistant_errors", "Stage failures, by stage.", ["kind"], registry=r)
        self.wake_detections = Counter("voice_assistant_wake_detections", "Wake words heard.", registry=r)
        self.sessions = Gauge("voice_assistant_sessions", "Open sessions.", registry=r)
        self.engine_up = Gauge("voice_assistant_engine_up", "1 while the language model answers.", registry=r)
        self.models_loaded = Gauge("voice_assistant_models_loaded", "1 once every model is loaded.", registry=r)
        self.audio_device_open = Gauge(
            "voice_assistant_audio_device_open", "1 while the microphone delivers frames.", registry=r
        )
        self.asyncio_tasks = Gauge("voice_assistant_asyncio_tasks", "Tasks alive on the event loop.", registry=r)
        self.threads = Gauge("voice_assistant_threads", "OS threads of the process.", registry=r)
        self.threads.set_function(os_threads)
        self.load = Gauge(
            "voice_assistant_load",
            "Room for one more session: below 1 the server accepts one (assistant/server/capacity.py).",
            registry=r,
        )
        self.accepting = Gauge("voice_assistant_accepting", "1 while a new session would be admitted.", registry=r)
        ProcessCollector(registry=r)
        self._engine_state: Callable[[], str] | None = None
        self.voice_to_voice_listeners: list[Callable[[float], None]] = []  # each turn's ms (admission)

    # ---- feeding --------------------------------------------------------

    def watch_engine(self, health: Callable[[], dict[str, Any]]) -> None:
        """Read the engine's state at each scrape (``models.llm.health``)."""
        self.engine_up.set_function(lambda: 1.0 if health().get("state") == "up" else 0.0)

    def watch_load(self, read: Callable[[], Any]) -> None:
        """Read the admission state (a :class:`~assistant.server.capacity.Load`) at each scrape."""
        self.load.set_function(lambda: float(read().load))
        self.accepting.set_function(lambda: 1.0 if read().accepting else 0.0)

    def watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count the loop's live tasks at each scrape (scrapes run on that loop)."""
        self.asyncio_tasks.set_function(lambda: float(len(asyncio.all_tasks(loop))))

    def observe(self, session: Any) -> Callable[[], None]:
        """Count a session's turns and events; returns what to call when it ends."""
        self.sessions.inc()
        seen_rejected = [0]

        def on_event(event: Event) -> None:
            match event:
                case ReplyInterrupted():
                    self.barge_ins.inc()
                case BudgetExceeded():
                    self.budget_overruns.labels(stage=event.stage).inc()
                case StageError():
                    self.errors.labels(kind=event.stage).inc()
                case _:
                    pass

        def on_turn(record: Any) -> None:
            data = session.report.turn_json(record)
            self.turns.labels(status=data["status"]).inc()
            for stage, ms in data["latency_ms"].items():
                if ms is None:
                    continue
                if stage == "voice_to_voice":
                    self.voice_to_voice.observe(ms / 1000)
                    for listener in self.voice_to_voice_listeners:
                        listener(ms)
                else:
                    self.stage_latency.labels(stage=stage).observe(ms / 1000)
            count_rejected()

        def count_rejected() -> None:
            vad = getattr(session.pipeline, "vad", None)
            rejected = getattr(vad, "rejected_barge_ins", 0)
            if rejected > seen_rejected[0]:
                self.barge_ins_rejected.inc(rejected - seen_rejected[0])
                seen_rejected[0] = rejected

        session.bus.subscribe(on_event)
        session.report.listeners.append(on_turn)

        def ended() -> None:
            count_rejected()
            self.sessions.dec()

        return ended

    # ---- reading --------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type, for an HTTP response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


async def serve_http(
    host: str, port: int, routes: dict[str, Callable[[], tuple[int, bytes, str]]]
) -> asyncio.Server:
    """A minimal HTTP/1.1 server for GET on a few paths (the kiosk's
    ``/metrics`` and ``/healthz`` on their own port). Anything else: 404/405."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5.0)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method not in ("GET", "HEAD"):
                status, body, ctype = 405, b"method not allowed\n", "text/plain"
            elif path in routes:
                status, body, ctype = routes[path]()
            else:
                status, body, ctype = 404, b"not found\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}.get(
                status, "OK"
            )
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        except Exception:  # a bug here must not take the kiosk down
            log.exception("metrics endpoint failed")
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
