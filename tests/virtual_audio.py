"""A private, virtual sound card for tests (PulseAudio, no hardware, no dbus).

A program under test (``voice-assistant mic``, or anything that uses
sounddevice / PortAudio / ALSA / PulseAudio) is run in a subprocess with
``env=va.env``. Its default input device then "hears" whatever the test
feeds with :meth:`VirtualAudio.play_into_mic`, and whatever it plays to its
default output can be captured to a WAV file with
:meth:`VirtualAudio.start_recording_speaker` / :meth:`VirtualAudio.stop_recording`::

    with VirtualAudio(tmp_path) as va:
        va.start_recording_speaker(tmp_path / "speaker.wav")
        proc = subprocess.Popen([...], env=va.env)
        va.play_into_mic("audio_assets/questions/capital_of_france.wav", lead_silence_s=0.5)
        va.wait_mic()
        ...
        speaker_wav = va.stop_recording()

How it works:

* A private ``pulseaudio`` daemon (``-n -F script``: no default modules, no
  dbus, no realtime, no shm, never exits by itself) listens on a unix socket
  in a short private temp dir, with its HOME, runtime and state dirs in the
  work dir. Running as root is fine (it only warns).
* ``va_speaker`` (a ``module-null-sink``, 48 kHz stereo by default) is the
  default sink; the test records its monitor with ``parec``.
* ``va_mic_in`` (a second null sink, 16 kHz mono by default) is fed by
  ``pacat``; its monitor is the default source, i.e. the microphone. The null
  sink's clock plays the feed at real-time pace and gives silence otherwise.
  At 16 kHz mono and 100 % volume the program receives the fed samples
  unchanged.
* A ``pacat`` playing zeros at low latency into each null sink keeps it
  rendering in small real-time blocks (an idle null sink renders 2 s ahead
  and a recorder that connects then waits up to 2 s for its first data).
* PortAudio on Debian talks to ALSA: ``ALSA_CONFIG_PATH`` in ``.env`` points
  at a generated ALSA config whose ``default`` PCM is the ``pulse`` plugin
  (package ``libasound2-plugins``). ``PULSE_SERVER`` / ``PULSE_SINK`` /
  ``PULSE_SOURCE`` make native PulseAudio clients use the same devices.
  ``HOME`` is not changed for the program under test.

Every process started here is ended by :meth:`VirtualAudio.stop` (and by the
context manager, and at interpreter exit); on Linux they also get SIGTERM if
the thread that started them dies (``PR_SET_PDEATHSIG``), so start and stop
a ``VirtualAudio`` from the same, long-lived thread.

Requires the Debian packages ``pulseaudio`` (which pulls in
``pulseaudio-utils`` and ``libasound2-plugins``). Without them
:class:`VirtualAudioUnavailable` is raised; :func:`unavailable_reason` says
why without starting anything, and :func:`skip_if_unavailable` skips a pytest
test (or fails it when ``VIRTUAL_AUDIO_REQUIRED=1``).
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

SPEAKER_SINK = "va_speaker"
MIC_FEED_SINK = "va_mic_in"
MIC_SOURCE = MIC_FEED_SINK + ".monitor"
DEAD_SINK = "va_unplugged"  # where an unplugged microphone's stream is left (silent)
SPEAKER_MONITOR = SPEAKER_SINK + ".monitor"

_TOOLS = ("pulseaudio", "pactl", "pacat", "parec")
_ALSA_PULSE_PLUGIN_GLOBS = (
    "/usr/lib/*/alsa-lib/libasound_module_pcm_pulse.so",
    "/usr/lib/alsa-lib/libasound_module_pcm_pulse.so",
    "/usr/lib64/alsa-lib/libasound_module_pcm_pulse.so",
)


class VirtualAudioUnavailable(RuntimeError):
    """PulseAudio (or the ALSA pulse plugin) is not installed here."""


def unavailable_reason() -> Optional[str]:
    """Why a VirtualAudio cannot be made here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return f"virtual audio needs Linux + PulseAudio (platform is {sys.platform})"
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return (f"virtual audio needs PulseAudio: {', '.join(missing)} not found "
                "(apt-get install --no-install-recommends pulseaudio)")
    if not any(glob.glob(g) for g in _ALSA_PULSE_PLUGIN_GLOBS):
        return ("virtual audio needs the ALSA pulse plugin libasound_module_pcm_pulse.so "
                "(apt-get install libasound2-plugins)")
    return None


def skip_if_unavailable() -> None:
    """For pytest: skip the test when virtual audio cannot work here.

    With ``VIRTUAL_AUDIO_REQUIRED=1`` in the environment (CI, where the
    Makefile installed PulseAudio) the test fails instead of skipping.
    """
    reason = unavailable_reason()
    if reason:
        import pytest

        if os.environ.get("VIRTUAL_AUDIO_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _stop_process(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM,
                  timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def _short_tempdir() -> str:
    """A fresh private dir whose socket path fits a unix address (108 bytes)."""
    base = tempfile.gettempdir()
    if len(base) > 60:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="va-", dir=base)


def _read_audio_int16(path: Path) -> tuple[bytes, int, int]:
    """Interleaved s16le bytes, rate and channels of a sound file."""
    try:
        import numpy as np
        import soundfile

        data, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
        return np.ascontiguousarray(data).astype("<i2").tobytes(), rate, data.shape[1]
    except ImportError:
        pass
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV can be read without soundfile")
        return w.readframes(w.getnframes()), w.getframerate(), w.getnchannels()


class VirtualAudio:
    """A private PulseAudio daemon with a virtual microphone and speaker.

    :param workdir: where logs, configs and temporary audio go (e.g. pytest's
        ``tmp_path``); the daemon's socket lives in a short private temp dir.
    :param mic_rate: sample rate of the microphone (the program gets the fed
        samples unchanged when it records mono at this rate).
    :param speaker_rate, speaker_channels: format of the speaker sink.

    Attributes set once started: ``env`` (environment for the program under
    test), ``server`` (PulseAudio server string), ``mic_started_at`` /
    ``speaker_started_at`` (``time.monotonic()`` when the last feed / the
    recording was connected), ``mic_feed_seconds`` (length of the last feed,
    silences included).
    """

    def __init__(self, workdir: PathLike, *, mic_rate: int = 16000, speaker_rate: int = 48000,
                 speaker_channels: int = 2, start_timeout: float = 15.0) -> None:
        self.workdir = Path(workdir).resolve() / "virtual_audio"
        self.mic_rate = mic_rate
        self.speaker_rate = speaker_rate
        self.speaker_channels = speaker_channels
        self.start_timeout = start_timeout
        self.env: dict[str, str] = {}
        self.server = ""
        self.mic_started_at: Optional[float] = None
        self.mic_feed_seconds: float = 0.0
        self.speaker_started_at: Optional[float] = None
        self._daemon: Optional[subprocess.Popen] = None
        self._feeder: Optional[subprocess.Popen] = None
        self._recorder: Optional[subprocess.Popen] = None
        self._keepalives: list[subprocess.Popen] = []
        self._rec_raw: Optional[Path] = None
        self._rec_out: Optional[Path] = None
        self._rec_format: tuple[int, int] = (16000, 1)
        self._rundir: Optional[str] = None
        self._log_file = None
        self._lock = threading.RLock()
        self._feed_count = 0
        self._atexit = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> "VirtualAudio":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        return self.workdir / "pulseaudio.log"

    def log_text(self) -> str:
        """The daemon's log so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> "VirtualAudio":
        reason = unavailable_reason()
        if reason:
            raise VirtualAudioUnavailable(reason)
        if self._daemon is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        home = self.workdir / "home"
        state = self.workdir / "state"
        for d in (home, state, home / ".config"):
            d.mkdir(parents=True, exist_ok=True)
        self._rundir = _short_tempdir()
        socket = os.path.join(self._rundir, "native")
        self.server = f"unix:{socket}"

        script = self.workdir / "va.pa"
        script.write_text(
            ".fail\n"
            f"load-module module-native-protocol-unix socket={socket} auth-anonymous=1\n"
            f"load-module module-null-sink sink_name={SPEAKER_SINK} format=s16le "
            f"rate={self.speaker_rate} channels={self.speaker_channels} "
            "sink_properties=device.description=VirtualSpeaker\n"
            f"load-module module-null-sink sink_name={MIC_FEED_SINK} format=s16le "
            f"rate={self.mic_rate} channels=1 "
            "sink_properties=device.description=VirtualMicrophoneFeed\n"
            f"set-default-sink {SPEAKER_SINK}\n"
            f"set-default-source {MIC_SOURCE}\n")
        client_conf = self.workdir / "client.conf"
        client_conf.write_text("autospawn = no\n")
        alsa_conf = self.workdir / "asound.conf"
        alsa_conf.write_text(
            "# Generated by tests/virtual_audio.py: everything goes to the private PulseAudio.\n"
            'pcm.!default { type pulse hint { show on description "Virtual audio (PulseAudio)" } }\n'
            "ctl.!default { type pulse }\n"
            "pcm.pulse { type pulse }\n"
            "ctl.pulse { type pulse }\n")

        daemon_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C", "LC_ALL": "C",
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_RUNTIME_DIR": self._rundir,
            "PULSE_RUNTIME_PATH": self._rundir,
            "PULSE_STATE_PATH": str(state),
            "PULSE_CONFIG_PATH": str(state),
        }
        self.env = dict(os.environ)
        for var in ("PULSE_PROP", "PULSE_LATENCY_MSEC", "PULSE_RUNTIME_PATH"):
            self.env.pop(var, None)
        self.env.update({
            "PULSE_SERVER": self.server,
            "PULSE_SINK": SPEAKER_SINK,
            "PULSE_SOURCE": MIC_SOURCE,
            "PULSE_COOKIE": str(home / "client-cookie"),
            "PULSE_CLIENTCONFIG": str(client_conf),
            "ALSA_CONFIG_PATH": str(alsa_conf),
        })

        self._log_file = open(self.log_path, "wb")
        self._daemon = subprocess.Popen(
            ["pulseaudio", "-n", "-F", str(script), "--daemonize=no", "--system=no",
             "--exit-idle-time=-1", "--disallow-exit", "--realtime=no", "--high-priority=no",
             "--disable-shm=yes", "--use-pid-file=no", "--log-target=stderr", "--log-level=notice"],
            env=daemon_env, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, cwd=self.workdir, preexec_fn=_pdeathsig)
        self._atexit = self.stop
        atexit.register(self._atexit)
        try:
            self._wait_ready()
            self._start_keepalives()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if self._daemon.poll() is not None:
                raise RuntimeError(f"pulseaudio exited with status {self._daemon.returncode}:\n"
                                   + self.log_text()[-3000:])
            try:
                res = self._pactl("list", "short", "sinks", timeout=5, check=False)
                last = res.stdout + res.stderr
                if res.returncode == 0 and SPEAKER_SINK in res.stdout and MIC_FEED_SINK in res.stdout:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"pulseaudio did not come up in {self.start_timeout} s "
                           f"(pactl said: {last.strip()!r}):\n{self.log_text()[-3000:]}")

    def _start_keepalives(self) -> None:
        """Keep both null sinks rendering in small blocks, in real time.

        An idle null sink renders up to 2 s ahead and then sleeps, so a
        recorder that connects later gets nothing for up to 2 s and then a
        burst. A low-latency stream of zeros into each sink keeps its block
        size at a few ms (adding zeros leaves the mixed samples unchanged);
        a suspend/resume then restarts its clock, and a probe recording
        checks that each monitor delivers audio at once.
        """
        for sink, rate in ((SPEAKER_SINK, self.speaker_rate), (MIC_FEED_SINK, self.mic_rate)):
            idx = self._index("sinks", sink)
            before = self._count("sink-inputs", idx)
            with open("/dev/zero", "rb") as zeros:
                proc = subprocess.Popen(
                    ["pacat", "--playback", "--raw", "--format=s16le", f"--rate={rate}",
                     "--channels=1", "--latency-msec=20", f"--device={sink}",
                     "--client-name=virtual-audio-keepalive", f"--stream-name=keepalive-{sink}"],
                    env=self._client_env(), stdin=zeros, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, preexec_fn=_pdeathsig)
            self._keepalives.append(proc)
            self._wait_stream(proc, "sink-inputs", idx, before, f"pacat (keepalive {sink})")
            # The sink still sleeps until the end of the 2 s it rendered ahead
            # when it was created; suspending and resuming it restarts its
            # clock at "now", with the small block size set by the keepalive.
            self._pactl("suspend-sink", sink, "1")
            self._pactl("suspend-sink", sink, "0")
        for monitor in (SPEAKER_MONITOR, MIC_SOURCE):
            self._probe(monitor)

    def _probe(self, monitor: str, timeout: float = 5.0) -> float:
        """Wait until a recorder on ``monitor`` gets data; returns the seconds it took."""
        t0 = time.monotonic()
        proc = subprocess.Popen(
            ["parec", "--raw", "--format=s16le", "--rate=8000", "--channels=1",
             "--latency-msec=20", f"--device={monitor}", "--client-name=virtual-audio-probe"],
            env=self._client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, preexec_fn=_pdeathsig)
        try:
            fd = proc.stdout.fileno()
            os.set_blocking(fd, False)
            while time.monotonic() - t0 < timeout:
                try:
                    if os.read(fd, 4096):
                        return time.monotonic() - t0
                except BlockingIOError:
                    pass
                if proc.poll() is not None:
                    break
                time.sleep(0.005)
            raise RuntimeError(f"no audio from {monitor} within {timeout} s:\n"
                               + self.log_text()[-2000:])
        finally:
            _stop_process(proc)
            proc.stdout.close()

    def stop(self) -> None:
        """End every process started here (idempotent)."""
        with self._lock:
            _stop_process(self._feeder)
            self._feeder = None
            if self._recorder is not None:
                try:
                    self.stop_recording(settle_s=0.0)
                except Exception:
                    pass
            for proc in self._keepalives:
                _stop_process(proc)
            self._keepalives = []
            _stop_process(self._daemon)
            self._daemon = None
            for raw in self.workdir.glob("mic_feed_*.raw"):
                raw.unlink(missing_ok=True)
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if self._rundir:
                shutil.rmtree(self._rundir, ignore_errors=True)
                self._rundir = None
            if self._atexit is not None:
                atexit.unregister(self._atexit)
                self._atexit = None

    @property
    def running(self) -> bool:
        return self._daemon is not None and self._daemon.poll() is None

    def _check_running(self) -> None:
        if not self.running:
            raise RuntimeError("VirtualAudio is not running:\n" + self.log_text()[-2000:])

    # -- helpers -------------------------------------------------------------

    def _client_env(self) -> dict[str, str]:
        return self.env

    def _pactl(self, *args: str, timeout: float = 10, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["pactl", *args], env=self._client_env(), capture_output=True,
                              text=True, timeout=timeout, check=check, stdin=subprocess.DEVNULL)

    def pactl(self, *args: str) -> str:
        """Run ``pactl`` against this daemon; returns its stdout."""
        return self._pactl(*args).stdout

    def _count(self, kind: str, device_index: str) -> int:
        """Streams (``sink-inputs`` / ``source-outputs``) on a device index."""
        out = self._pactl("list", "short", kind, check=False).stdout
        return sum(1 for line in out.splitlines() if line.split("\t")[1:2] == [device_index])

    def _index(self, kind: str, name: str) -> str:
        for line in self._pactl("list", "short", kind).stdout.splitlines():
            cols = line.split("\t")
            if len(cols) > 1 and cols[1] == name:
                return cols[0]
        raise RuntimeError(f"no {kind} named {name}")

    def _wait_stream(self, proc: subprocess.Popen, kind: str, device_index: str, before: int,
                     what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._count(kind, device_index) > before:
                return
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"{what} exited with status {proc.returncode}: {err}")
            time.sleep(0.01)
        raise RuntimeError(f"{what} did not connect within {timeout} s")

    # -- microphone ----------------------------------------------------------

    def remove_mic(self) -> None:
        """Unplug the microphone: unload the module behind its source.

        PulseAudio moves a recording stream whose source goes away to the
        default source; here that is a suspended, silent one, so the stream
        delivers nothing, as a USB microphone's stream does once it is
        pulled out (pactl 16 cannot kill a stream).
        """
        if DEAD_SINK not in self._pactl("list", "short", "sinks").stdout:
            self._pactl("load-module", "module-null-sink", f"sink_name={DEAD_SINK}", "format=s16le",
                        f"rate={self.mic_rate}", "channels=1", "sink_properties=device.description=Unplugged")
        self._pactl("suspend-sink", DEAD_SINK, "1")
        self._pactl("set-default-source", DEAD_SINK + ".monitor")
        for line in self._pactl("list", "short", "modules").stdout.splitlines():
            cols = line.split("\t")
            if len(cols) > 2 and "module-null-sink" in cols[1] and f"sink_name={MIC_FEED_SINK}" in cols[2]:
                self._pactl("unload-module", cols[0])
                return
        raise RuntimeError("the microphone's module is not loaded")

    def restore_mic(self) -> None:
        """Plug the microphone back in (the same source name)."""
        self._pactl("load-module", "module-null-sink", f"sink_name={MIC_FEED_SINK}", "format=s16le",
                    f"rate={self.mic_rate}", "channels=1", "sink_properties=device.description=VirtualMicrophoneFeed")
        self._pactl("set-default-source", MIC_SOURCE)

    def play_into_mic(self, wav_path: PathLike, lead_silence_s: float = 0.5,
                      trail_silence_s: float = 0.5) -> float:
        """Start feeding a sound file into the microphone at real-time pace.

        Returns at once (after the feed is connected, which is also when
        ``mic_started_at`` is taken); the program hears ``lead_silence_s`` of
        silence, the file, then ``trail_silence_s`` of silence, then the
        silence of an idle microphone. Any rate / channel count / format
        libsndfile reads is accepted (PCM16 WAV only without soundfile).
        Returns the length of the feed in seconds (also ``mic_feed_seconds``).
        """
        self._check_running()
        if self.mic_busy:
            raise RuntimeError("the microphone is still playing the previous file; "
                               "call wait_mic() or stop_mic() first")
        data, rate, channels = _read_audio_int16(Path(wav_path))
        frame = 2 * channels
        lead = b"\0" * (int(round(lead_silence_s * rate)) * frame)
        trail = b"\0" * (int(round(trail_silence_s * rate)) * frame)
        self._feed_count += 1
        raw = self.workdir / f"mic_feed_{self._feed_count}.raw"
        raw.write_bytes(lead + data + trail)
        self.mic_feed_seconds = (len(lead) + len(data) + len(trail)) / frame / rate
        idx = self._index("sinks", MIC_FEED_SINK)
        before = self._count("sink-inputs", idx)
        with open(raw, "rb") as stdin:
            self._feeder = subprocess.Popen(
                ["pacat", "--playback", "--raw", "--format=s16le", f"--rate={rate}",
                 f"--channels={channels}", f"--device={MIC_FEED_SINK}",
                 "--client-name=virtual-audio-mic", "--stream-name=mic-feed"],
                env=self._client_env(), stdin=stdin, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, preexec_fn=_pdeathsig)
        self._wait_stream(self._feeder, "sink-inputs", idx, before, "pacat (mic feed)")
        self.mic_started_at = time.monotonic()
        return self.mic_feed_seconds

    @property
    def mic_busy(self) -> bool:
        return self._feeder is not None and self._feeder.poll() is None

    def wait_mic(self, timeout: Optional[float] = None) -> None:
        """Block until the current feed has been played out completely."""
        if self._feeder is None:
            return
        if timeout is None:
            timeout = self.mic_feed_seconds + 10.0
        rc = self._feeder.wait(timeout=timeout)
        if rc != 0:
            err = self._feeder.stderr.read().decode(errors="replace") if self._feeder.stderr else ""
            raise RuntimeError(f"pacat (mic feed) failed with status {rc}: {err}")

    def stop_mic(self) -> None:
        """Cut the current feed short (the microphone goes silent)."""
        _stop_process(self._feeder)

    # -- speaker -------------------------------------------------------------

    def start_recording_speaker(self, out_wav: PathLike, rate: int = 16000,
                                channels: int = 1) -> None:
        """Record everything played to the default output, from now on.

        Returns once the recorder is connected (``speaker_started_at``); the
        WAV (PCM16 at ``rate``, ``channels``) is written by :meth:`stop_recording`.
        """
        self._check_running()
        if self._recorder is not None:
            raise RuntimeError("already recording the speaker")
        self._rec_out = Path(out_wav)
        self._rec_raw = self.workdir / (self._rec_out.name + ".raw")
        self._rec_format = (rate, channels)
        idx = self._index("sources", SPEAKER_MONITOR)
        before = self._count("source-outputs", idx)
        with open(self._rec_raw, "wb") as stdout:
            self._recorder = subprocess.Popen(
                ["parec", "--raw", "--format=s16le", f"--rate={rate}", f"--channels={channels}",
                 f"--device={SPEAKER_MONITOR}", "--latency-msec=20",
                 "--client-name=virtual-audio-speaker", "--stream-name=speaker-recording"],
                env=self._client_env(), stdin=subprocess.DEVNULL, stdout=stdout,
                stderr=subprocess.PIPE, preexec_fn=_pdeathsig)
        self._wait_stream(self._recorder, "source-outputs", idx, before, "parec (speaker)")
        self.speaker_started_at = time.monotonic()

    def stop_recording(self, settle_s: float = 0.3) -> Path:
        """Stop recording the speaker and write the WAV; returns its path.

        Waits ``settle_s`` first so that audio still in flight is captured.
        """
        if self._recorder is None:
            raise RuntimeError("not recording the speaker")
        if settle_s > 0:
            time.sleep(settle_s)
        _stop_process(self._recorder, signal.SIGINT)
        self._recorder = None
        rate, channels = self._rec_format
        data = self._rec_raw.read_bytes()
        data = data[: len(data) - len(data) % (2 * channels)]
        self._rec_out.parent.mkdir(parents=True, exist_ok=True)
        with wave.open(str(self._rec_out), "wb") as w:
            w.setnchannels(channels)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(data)
        self._rec_raw.unlink()
        return self._rec_out
