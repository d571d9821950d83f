"""Audio files: decoding anything FFmpeg reads, and plain WAV in and out.

:func:`decode_file` turns any common audio file into mono int16 at the
pipeline rate with PyAV (FFmpeg), and turns every bad input into one
:class:`~audio.errors.InputError` line that names the file, because this is
where a user's typo or wrong file first shows up. :func:`read_wav` and
:func:`write_wav` use only the stdlib, so tests can check what was written
without going through the decoder under test.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import struct
import wave
from pathlib import Path
from typing import Any

import av
import numpy as np

from .errors import InputError, one_line
from .frame import as_pcm16, pcm16_from_bytes

__all__ = ["decode_file", "write_wav", "read_wav"]

log = logging.getLogger("audio")

_EMPTY = np.zeros(0, dtype=np.int16)

# How far the container's stated duration may exceed the limit before the
# file is refused without decoding: stated durations are sometimes estimates
# (an MP3 without a Xing header), so the exact check happens while decoding.
_METADATA_SLACK_S = 1.0
# Exact check while decoding: resampling may round the length by a sample.
_DECODE_SLACK_S = 0.01
# Sample formats whose values can be NaN or infinite (FFmpeg names).
_FLOAT_FORMATS = frozenset({"flt", "fltp", "dbl", "dblp"})
# Bytes after a WAV's data chunk that are not chunks, counted as samples the
# header does not declare, beyond which the file is refused.
_WAV_SLACK_S = 0.5


def decode_file(path: str | Path, rate: int = 16000, max_seconds: float = 300.0) -> np.ndarray:
    """Decode any audio file PyAV can read to mono int16 PCM at ``rate``.

    All channels are downmixed; any sample rate is resampled. Every bad input
    (missing, a directory, unreadable, not audio, no audio stream, empty, too
    long) raises :class:`InputError` with one line naming the file, because
    this is where a user's typo or wrong file first shows up. Files longer
    than ``max_seconds`` are refused from the container's stated duration
    before decoding, and decoding stops as soon as the limit is passed (for
    files whose duration is unknown or wrong).
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    path = Path(path)
    _check_readable_file(path)
    try:
        container = av.open(str(path), mode="r")
    except Exception as e:  # av.FFmpegError, OSError, ... never a traceback
        raise _open_error(path, e) from None
    try:
        streams = container.streams.audio
        if not streams and container.format.name == "tty":  # FFmpeg reads .txt as ANSI art
            raise InputError(f"{path} is not an audio file (it looks like text)")
        if not streams:
            kinds = sorted({s.type for s in container.streams})
            found = f" (it has only {', '.join(kinds)} streams)" if kinds else ""
            raise InputError(f"{path} has no audio stream{found}")
        stream = streams[0]
        if container.format.name == "wav":
            _check_wav_length(path, st_size=path.stat().st_size)
        stated = _metadata_seconds(container, stream)
        if stated is not None and stated > max_seconds + _METADATA_SLACK_S:
            raise InputError(_too_long(path, f"is {stated:.1f} s long", max_seconds))
        pcm = _decode_stream(path, container, stream, rate, max_seconds)
    finally:
        container.close()
    if len(pcm) == 0:
        raise InputError(f"{path} is empty: it contains no audio samples")
    return pcm


def _check_readable_file(path: Path) -> None:
    """Refuse what FFmpeg would report obscurely (or not at all) up front."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"audio file not found: {path}") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {one_line(e.strerror or e)}") from None
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an audio file")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {path}: permission denied")
    if st.st_size == 0:
        raise InputError(f"{path} is empty (0 bytes)")


def _open_error(path: Path, error: Exception) -> InputError:
    """Map an error from ``av.open`` to a user line."""
    code = getattr(error, "errno", None)
    if isinstance(error, PermissionError) or code == errno.EACCES:
        return InputError(f"cannot read {path}: permission denied")
    if isinstance(error, FileNotFoundError) or code == errno.ENOENT:
        return InputError(f"audio file not found: {path}")
    if isinstance(error, EOFError):
        return InputError(f"{path} is not a readable audio file (it ends too early: truncated?)")
    reason = getattr(error, "strerror", None) or one_line(error)
    return InputError(f"{path} is not a readable audio file ({one_line(reason)})")


def _metadata_seconds(container: Any, stream: Any) -> float | None:
    """The duration the file states, without decoding; None when unknown."""
    try:
        if stream.duration is not None and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
            if seconds > 0:
                return seconds
        if container.duration is not None and container.duration > 0:
            return container.duration / av.time_base
    except Exception:  # odd metadata is not worth failing over
        pass
    return None


def _check_wav_length(path: Path, st_size: int) -> None:
    """Refuse a WAV whose data chunk states fewer samples than the file holds.

    FFmpeg reads what the header states: a header saying 10 s over 301 s of
    samples was cut to 10 s without a word. Chunks after the data (LIST,
    id3) are metadata, not samples; a streamed WAV (size 0 or 0xFFFFFFFF)
    states nothing to check.
    """
    try:
        with path.open("rb") as f:
            head = f.read(65536)
            if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return
            pos, align, rate, data_at, data_size = 12, 0, 0, -1, 0
            while pos + 8 <= len(head):
                kind, size = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
                if kind == b"fmt " and pos + 24 <= len(head):
                    rate = struct.unpack("<I", head[pos + 12 : pos + 16])[0]
                    align = struct.unpack("<H", head[pos + 20 : pos + 22])[0]
                elif kind == b"data":
                    data_at, data_size = pos + 8, size
                    break
                pos += 8 + size + (size & 1)
            if data_at < 0 or not align or not rate or data_size in (0, 0xFFFFFFFF):
                return
            pos = data_at + data_size + (data_size & 1)
            while pos + 8 <= st_size:  # the chunks after the data, if that is what follows
                f.seek(pos)
                header = f.read(8)
                size = struct.unpack("<I", header[4:8])[0]
                if not all(32 <= b < 127 for b in header[:4]) or pos + 8 + size > st_size:
                    break
                pos += 8 + size + (size & 1)
    except (OSError, struct.error):
        return  # FFmpeg says what is wrong with an unreadable file
    undeclared = st_size - pos
    if undeclared > _WAV_SLACK_S * rate * align:
        stated, held = data_size / (rate * align), (st_size - data_at) / (rate * align)
        raise InputError(
            f"{path}: its header says {stated:.1f} s of audio but the file holds {held:.1f} s "
            "(a damaged or hand-written WAV header; re-save the file)"
        )


def _check_finite(path: Path, frame: Any) -> None:
    """NaN or infinite float samples, which the conversion to PCM16 turned into silence."""
    if frame.format.name not in _FLOAT_FORMATS:
        return
    data = frame.to_ndarray()
    if np.isfinite(data).all():
        return
    what = "NaN (not a number)" if np.isnan(data).any() else "infinite values"
    raise InputError(f"{path} holds samples that are {what}: it is damaged or was written wrongly")


def _too_long(path: Path, how_long: str, max_seconds: float) -> str:
    return f"{path} {how_long}; the limit is {max_seconds:g} s (audio.max_input_seconds)"


def _decode_stream(
    path: Path, container: Any, stream: Any, rate: int, max_seconds: float
) -> np.ndarray:
    """Decode one audio stream to mono int16 at ``rate``, stopping past the limit."""
    limit = int(math.ceil((max_seconds + _DECODE_SLACK_S) * rate))
    chunks: list[np.ndarray] = []
    total = 0
    resampler: av.AudioResampler | None = None
    first_error: Exception | None = None
    bad_packets = 0

    def take(frames: list[Any]) -> None:
        nonlocal total
        for out in frames:
            data = out.to_ndarray().reshape(-1)
            chunks.append(data)
            total += len(data)
        if total > limit:
            raise InputError(_too_long(path, f"is more than {max_seconds:g} s long", max_seconds))

    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as e:  # one damaged packet: skip it, as ffmpeg does
                bad_packets += 1
                first_error = first_error or e
                continue
            for frame in frames:
                if frame.samples == 0:  # FFmpeg refuses to filter an empty frame
                    continue
                _check_finite(path, frame)
                if resampler is None:
                    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
                try:
                    take(resampler.resample(frame))
                except ValueError as e:
                    if "does not match" not in str(e):
                        raise
                    # The stream changed rate or channel layout mid-way
                    # (concatenated MP3s do): finish the old converter, start anew.
                    take(resampler.resample(None))
                    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
                    take(resampler.resample(frame))
        if resampler is not None:
            take(resampler.resample(None))
    except InputError:
        raise
    except Exception as e:  # corrupt data, decoder failure: one line, no traceback
        reason = getattr(e, "strerror", None) or one_line(e)
        raise InputError(f"cannot decode {path}: {one_line(reason)}") from None
    if total == 0 and first_error is not None:
        reason = getattr(first_error, "strerror", None) or one_line(first_error)
        raise InputError(f"{path} is not a readable audio file ({one_line(reason)})")
    if bad_packets:
        log.warning("%s: skipped %d damaged packet(s)", path, bad_packets)
    if not chunks:
        return _EMPTY.copy()
    # to_ndarray() may hand out views of frame buffers; concatenate copies them.
    return np.concatenate(chunks).astype(np.int16, copy=False)


def write_wav(path: str | Path, pcm: np.ndarray, rate: int) -> None:
    """Write mono int16 PCM as a WAV file (the reply recordings and test inputs)."""
    data = as_pcm16(pcm)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(data.astype("<i2", copy=False).tobytes())


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit WAV as mono int16 (channels averaged) and its rate.

    Only the stdlib is involved, so tests can check what was written without
    going through the decoder under test.
    """
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except FileNotFoundError:
        raise InputError(f"audio file not found: {path}") from None
    except (wave.Error, EOFError, OSError) as e:
        raise InputError(f"{path} is not a readable WAV file ({one_line(e)})") from None
    if width != 2:
        raise InputError(f"{path} is a {8 * width}-bit WAV; expected 16-bit")
    return pcm16_from_bytes(raw, width, channels), rate
