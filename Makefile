# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   runs the demo job on the local stack (embedded PostgreSQL, SQS emulator, workers)
#   make test   runs ruff, mypy and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

.PHONY: install demo test lint typecheck unit test-slow lock ui clean

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dagster-taskiq demo

ui: $(STAMP)
	$(BIN)/dagster-taskiq ui

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# Long fault runs (marked `slow`); pytest's exit code 5 means none are collected yet.
test-slow: $(STAMP)
	$(BIN)/pytest -m slow $(PYTEST_ARGS) || test $$? -eq 5

# Re-pin every dependency from a fresh resolve of pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	.lock-venv/bin/pip freeze --exclude-editable > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
