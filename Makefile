# The two commands of the contract: `make run` and `make test`, each idempotent from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck bench setup system-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "callgate needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The demo: `gateway serve` on the embedded engine (no network, no key), the sample call streamed
# through its own Twilio endpoint as Twilio would, the transcript printed live; the server keeps
# running for real calls until Ctrl-C.
run: $(STAMP)
	$(BIN)/gateway --config config/gateway.toml serve --demo samples/diane_sheila.wav \
		--demo-param inbound_participant=Diane --demo-param outbound_participant=Sheila

# Debian packages the tests drive (headless Chromium, systemd-analyze, ...): installed if missing.
system-deps:
	bash scripts/install-system-deps.sh

test: $(STAMP) system-deps lint typecheck
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench

typecheck: $(STAMP)
	$(BIN)/mypy gateway

bench: $(STAMP)
	$(BIN)/python bench/transcribe.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
