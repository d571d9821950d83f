"""What one client may send: the token buckets behind the input-rate and message-rate limits.

Every connection has two (:class:`~assistant.server.connection.Connection`):
messages of any kind (``server.max_messages_per_s``, bursts of
``server.message_burst``) and seconds of audio (``server.max_input_rate``
times real time, :func:`audio_bucket`). A client that runs one dry is
closed with the fatal error its protocol names (``message_rate``,
``input_rate``).
"""

from __future__ import annotations

from typing import Final

from pipeline.frames import now

RATE_WINDOW_S: Final = 2.0  # the input rate check's burst allowance, in seconds of wall clock


class TokenBucket:
    """A token bucket: holds ``capacity``, refills at ``rate`` per second.

    Two per connection: audio seconds (refilling at ``server.max_input_rate``
    x real time) and messages (``server.max_messages_per_s``). A client that
    sends in bursts (network hiccups, big messages) is fine while one that
    sends faster than the rate runs dry after one burst.
    """

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = max(capacity, 1.0)
        self._tokens = self.capacity
        self._at = now()

    def take(self, amount: float, at: float) -> bool:
        self._tokens = min(self.capacity, self._tokens + (at - self._at) * self.rate)
        self._at = at
        self._tokens -= amount
        return self._tokens >= 0


def audio_bucket(max_input_rate: float, max_message_bytes: int, input_rate: int) -> TokenBucket:
    """The input-rate check for a session whose audio comes at ``input_rate``.

    It holds ``RATE_WINDOW_S`` of audio at the allowed rate, or one message of
    the largest size the server accepts if that is more (262,142 bytes are
    8.19 s at 16 kHz): the docs allow any even length up to
    ``max_message_bytes``, so one such frame must pass.
    """
    largest = max_message_bytes // 2 / input_rate
    return TokenBucket(max_input_rate, max(max_input_rate * RATE_WINDOW_S, largest))
