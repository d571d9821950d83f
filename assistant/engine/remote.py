"""The remote engine: any OpenAI-compatible vLLM server, over HTTP.

A fleet shares one engine (``voice-assistant engine``, a plain ``vllm
serve``, or several replicas behind vLLM's router): each voice server
streams ``/v1/chat/completions`` from it with the official ``openai`` SDK
and never imports vLLM. The prompt is the same as the local engine's (the
system prompt, then the history, appended only), so vLLM's prefix cache
hits turn after turn; each request carries ``X-Session-ID`` so a router
with session affinity (vllm-router ``--policy consistent_hash``) keeps a
session on the replica that holds its prefix.

Cancelling a turn closes the HTTP stream, which is how vLLM's server learns
to abort the request (it has no cancel endpoint): its ``/metrics`` then show
``vllm:num_requests_running`` back at 0 and the abort counted in
``vllm:request_success_total{finished_reason="abort"}``.

An engine that cannot be reached is not a crash: the turn fails at once
with :class:`pipeline.llm.EngineUnavailable` (the LLM stage answers with
the error phrase and the client gets an ``error`` event), the voice server goes on serving, and
a probe retries with backoff until the engine answers again. ``/healthz``
shows the state (:meth:`RemoteModel.health`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.llm import CallPiece, EngineUnavailable, ForcedCall, Message
from pipeline.tools import NO_TOOLS, ToolChoice, ToolSpec, call_schema, offered, plain_messages

from ..errors import ConfigError
from ..telemetry import Sample, scrape, total

log = logging.getLogger("assistant.engine")

API_KEY_ENV = "VOICE_ASSISTANT_LLM_API_KEY"


@dataclass(frozen=True)
class RemoteSettings:
    """What the remote engine needs (from the config's ``llm`` keys)."""

    url: str  # the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1
    api_key: str | None
    model_name: str | None  # None: the server's only model
    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    connect_timeout_s: float
    read_timeout_s: float
    tool_parser: str = "none"  # the server parses calls the model chooses itself ("auto")

    @classmethod
    def from_config(cls, config: Any) -> RemoteSettings:
        llm = config.llm
        return cls(
            url=llm.url.rstrip("/"),
            api_key=os.environ.get(API_KEY_ENV) or llm.api_key,
            model_name=llm.model_name,
            max_tokens=llm.max_tokens,
            min_tokens=llm.min_tokens,
            temperature=llm.temperature,
            top_p=llm.top_p,
            connect_timeout_s=llm.connect_timeout_s,
            read_timeout_s=llm.read_timeout_s,
            tool_parser=llm.tool_parser,
        )

    @property
    def root(self) -> str:
        """The server's root (``/health``, ``/metrics``): the URL without ``/v1``."""
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url


# Probe intervals while the engine is down: quick at first, then every 5 s.
_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 5.0)


class RemoteModel:
    """:class:`pipeline.llm.LanguageModel` over a vLLM OpenAI-compatible server."""

    def __init__(self, settings: RemoteSettings) -> None:
        import httpx
        import openai

        self.settings = settings
        self._openai = openai
        timeout = httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)
        # No retries inside a turn: a retry would be heard as a long silence;
        # the probe below retries in the background instead.
        self._client = openai.AsyncOpenAI(
            base_url=settings.url, api_key=settings.api_key or "none", timeout=timeout, max_retries=0
        )
        self.model_name = settings.model_name
        self.state = "unknown"  # "up" once the server listed its models, "down" while unreachable
        self.since = time.time()
        self.error: str | None = None
        self._probe: asyncio.Task[None] | None = None
        self._open: dict[str, Any] = {}  # request id -> its open stream
        # Session ids ("s1") are per process: several voice servers on one
        # router would send the same X-Session-ID (one replica for all their
        # first sessions) and the same X-Request-ID. This process's tag makes
        # both unique across the fleet.
        self.tag = uuid.uuid4().hex[:8]

    # ---- the LanguageModel calls -----------------------------------------

    async def stream(
        self,
        messages: list[Message],
        request_id: str,
        session_id: str = "",
        tools: Sequence[ToolSpec] = (),
        tool_choice: ToolChoice = NO_TOOLS,
    ) -> AsyncIterator[tuple[str, str | None] | CallPiece]:
        """The server's stream; a forced ``tool_choice`` (named, required) is
        vLLM's structured outputs there, ``auto`` needs its tool parser
        (``llm.tool_parser``; without one the model is not offered the tools)."""
        if tool_choice.mode == "auto" and self.settings.tool_parser == "none":
            tools = ()
        schema = call_schema(tools, tool_choice) if tools else None
        forced = ForcedCall(tool_choice) if schema is not None else None
        if self.settings.tool_parser == "none":  # a template without tools: calls and results as text
            messages = plain_messages(messages, offered(tools, tool_choice))
        if self.state != "up":
            await self.connect()
            if self.state != "up":
                raise EngineUnavailable(self._down_message())
        s = self.settings
        openai = self._openai
        try:
            stream = await self._client.chat.completions.create(
                model=self.model_name or "",
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                top_p=s.top_p if s.temperature > 0 else 1.0,
                extra_body={"min_tokens": s.min_tokens} if s.min_tokens else None,
                extra_headers={"X-Session-ID": f"{self.tag}-{session_id}", "X-Request-ID": f"{self.tag}-{request_id}"},
                **self._tool_fields(tools, tool_choice, schema),
            )
        except openai.APIConnectionError as exc:  # includes timeouts
            self._went_down(_reason(exc))
            raise EngineUnavailable(self._down_message()) from None
        except openai.APIStatusError as exc:
            if exc.status_code in (502, 503, 504):  # a router with no live replica, a proxy with no upstream
                self._went_down(f"{exc.status_code} {_detail(exc)}")
                raise EngineUnavailable(self._down_message()) from None
            raise EngineUnavailable(
                f"the language model server at {s.url} refused the request: {exc.status_code} {_detail(exc)}"
            ) from None
        self._open[request_id] = stream
        try:
            async for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if forced is not None:  # the content is the call, written under its schema
                    piece = forced.piece(choice.delta.content or "")
                    if piece is not None:
                        yield piece
                    continue
                for call in choice.delta.tool_calls or ():
                    function = call.function
                    yield CallPiece(call.index, (function.arguments if function else None) or "", call.id,
                                    function.name if function else None)
                yield choice.delta.content or "", choice.finish_reason
        except openai.APIConnectionError as exc:
            self._went_down(_reason(exc))
            raise EngineUnavailable(self._down_message()) from None
        finally:
            self._open.pop(request_id, None)
            await stream.close()  # mid-reply: vLLM sees the disconnect and aborts
        if forced is not None:
            last = forced.end(request_id)
            if last is not None:
                yield last
            yield "", "tool_calls"

    def _tool_fields(self, tools: Sequence[ToolSpec], choice: ToolChoice, schema: dict[str, Any] | None) -> dict[str, Any]:
        """A forced call as a JSON-schema response (vLLM's structured outputs: any server, no
        tool parser needed); a choice left to the model as tools for the server's parser."""
        if schema is not None:
            return {"response_format": {"type": "json_schema", "json_schema": {"name": "call", "schema": schema}}}
        if tools:
            return {"tools": [t.openai() for t in tools], "tool_choice": choice.openai()}
        return {}

    async def abort(self, request_id: str) -> None:
        """Close the request's stream: the server aborts it."""
        stream = self._open.pop(request_id, None)
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.close()

    def count_tokens(self, text: str) -> int:
        """An upper estimate (no tokenizer here): one token per 3 UTF-8 bytes.

        Used only to keep the history within ``llm.history_tokens``; erring
        high drops an old turn a little early, never overflows the context.
        """
        return max(1, math.ceil(len(text.encode("utf-8")) / 3))

    # ---- the engine's state ----------------------------------------------

    async def connect(self) -> None:
        """Ask the server for its models (and pick the only one if none is
        configured); on failure the engine is down and the probe starts."""
        try:
            models = await self._client.models.list()
        except self._openai.APIConnectionError as exc:
            self._went_down(_reason(exc))
            return
        except self._openai.APIStatusError as exc:
            self._went_down(f"{exc.status_code} {_detail(exc)}")
            return
        names = [m.id for m in models.data]
        if self.settings.model_name is None:
            if len(names) != 1:
                raise ConfigError(
                    f"llm.model_name: the server at {self.settings.url} serves "
                    f"{len(names)} models ({', '.join(names) or 'none'}); name the one to use"
                )
            self.model_name = names[0]
        elif self.settings.model_name not in names:
            raise ConfigError(
                f"llm.model_name: the server at {self.settings.url} has no model "
                f"{self.settings.model_name!r} (it serves: {', '.join(names) or 'none'})"
            )
        if self.state != "up":
            log.info("language model server at %s is up (model %s)", self.settings.url, self.model_name)
            self.state, self.since, self.error = "up", time.time(), None

    def _went_down(self, reason: str) -> None:
        if self.state != "down":
            log.warning("language model server at %s is unreachable: %s; retrying", self.settings.url, reason)
            self.state, self.since = "down", time.time()
        self.error = reason
        if self._probe is None or self._probe.done():
            with contextlib.suppress(RuntimeError):  # no running loop: the next turn connects
                self._probe = asyncio.get_running_loop().create_task(self._retry(), name="engine-probe")

    async def _retry(self) -> None:
        """Probe the server with backoff until it answers."""
        attempt = 0
        while self.state == "down":
            await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
            attempt += 1
            try:
                await self.connect()
            except ConfigError as exc:  # it came back serving other models
                self.error = str(exc)

    def _down_message(self) -> str:
        return f"the language model server at {self.settings.url} is unreachable ({self.error}); retrying"

    def health(self) -> dict[str, Any]:
        """For /healthz: where the engine is, whether it answers, since when."""
        return {
            "kind": "remote",
            "url": self.settings.url,
            "model": self.model_name,
            "state": self.state,
            "since": round(self.since, 3),
            "error": self.error,
        }

    def metrics(self) -> list[Sample]:
        """The server's own Prometheus figures (``/metrics``)."""
        return scrape(self.settings.root + "/metrics", self.settings.api_key)

    def pending_requests(self) -> int:
        """Requests running or waiting on the server (all its clients)."""
        m = self.metrics()
        return int(total(m, "vllm:num_requests_running") + total(m, "vllm:num_requests_waiting"))

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self._client.close()


def _reason(exc: Exception) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(cause or exc).strip() or type(cause or exc).__name__
    return text.splitlines()[0][:200]


def _detail(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if message:
            return str(message)[:200]
    response = getattr(exc, "response", None)
    text = getattr(response, "text", "") if response is not None else ""
    if isinstance(text, str) and text.strip() and not text.lstrip().startswith(("{", "<")):
        return text.strip().splitlines()[0][:200]  # a plain-text answer (vllm-router: "No workers are ...")
    return str(getattr(exc, "message", exc))[:200]
