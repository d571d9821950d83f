"""The Wyoming protocol face (Home Assistant): speech-to-text, text-to-speech
and the language model as a conversation agent, over the shared models.

Every Wyoming message of the project lives in this package (:mod:`.info`:
what it announces; :mod:`.handler`: one connection; :mod:`.service`: the
server and the command); the framing, the event
classes and the TCP/Unix server are the ``wyoming`` package's own. One
:class:`WyomingHandler` serves one connection and keeps it open between
requests (Home Assistant opens one per request and names the conversation
in each transcript's ``context``; a program may also reuse one):

* ``describe`` → ``info``: ASR (Whisper), TTS (piper) and a handle program
  (the language model), each ``installed``, all three streaming.
* ``transcribe`` + ``audio-start``/``audio-chunk``/``audio-stop`` →
  ``transcript-start``, ``transcript-chunk`` …, the legacy ``transcript``,
  ``transcript-stop``. While audio arrives the utterance is re-decoded on
  the ASR stage's cadence and words two decodes agree on go out as chunks
  at once; the final decode's remaining words follow at ``audio-stop``.
  The ``transcript`` event is authoritative: if the final decode disagrees
  with a word already sent as a chunk, only it has the right text.
* ``synthesize`` → ``audio-start``/``audio-chunk`` …/``audio-stop`` at the
  voice's own rate (16-bit mono). Streaming: ``synthesize-start``,
  ``synthesize-chunk`` … are cut into speakable chunks by the reply
  chunker's :class:`~pipeline.chunker.Segmenter` and spoken as each is
  complete; the legacy ``synthesize`` inside a stream is ignored;
  ``synthesize-stop`` → the last audio, ``audio-stop``,
  ``synthesize-stopped``.
* ``transcript`` (from Home Assistant to a handle program) → ``handled-start``,
  ``handled-chunk`` per streamed piece, the legacy ``handled``,
  ``handled-stop``; the prompt is the configured system prompt and the
  history: the ``conversation_id`` in the transcript's ``context`` (Home
  Assistant sends one and opens a connection per request) or else this
  connection's own. An engine failure → ``not-handled`` with
  ``llm.error_phrase`` (or, mid-answer, that phrase as the last chunk), and
  the exchange stays out of the history, as in a voice session.

The streaming events always bracket the legacy one, as the protocol
prescribes, so a client that knows only the legacy events reads it and
ignores the rest (the ``wyoming`` package's reader does not hand the peer's
version to a handler, so nothing can be chosen by it).

Bad input (an unknown event, missing fields, an unreadable audio format,
audio without ``transcribe``, a stream chunk without its start) is answered
with an ``error`` event and the connection goes on. A line that is not JSON
ends the connection: the package's reader gives up on the stream there.
"""

from .handler import WyomingHandler
from .service import WyomingServer, announce, parse_uri, wyoming_command, wyoming_server

__all__ = ["WyomingHandler", "WyomingServer", "announce", "parse_uri", "wyoming_command", "wyoming_server"]
