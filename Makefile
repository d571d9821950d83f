# Two commands on a fresh machine:
#   make run    install on first use, then serve the assistant: open the URL it prints
#   make mic    install on first use, then talk through this machine's microphone and speaker
#   make test   install on first use, then run the whole test suite
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run mic test install bench assets clean-cache

install:
	@scripts/install.sh

run: install
	$(BIN)/voice-assistant serve $(ARGS)

mic: install
	$(BIN)/voice-assistant mic $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

assets: install
	$(BIN)/python audio_assets/make_assets.py

clean-cache:
	rm -rf ~/.cache/voice-assistant
