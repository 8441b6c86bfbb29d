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

.PHONY: install demo test lint typecheck unit test-slow lock ui clean synth bench

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

# Side by side with Dagster's executors and dagster-celery (on Redis: the local one, one it
# starts, or skipped with the reason); writes benchmarks/results/latest.json and .png.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# The CDK app (cdk/) synthesized into cdk.out/, offline: no AWS account (the stack is
# environment-agnostic) and no Docker (the worker image is built by `cdk deploy`). The CLI is
# the one pinned in package-lock.json, installed again whenever the lockfile changes.
synth: $(STAMP)
	test node_modules/.package-lock.json -nt package-lock.json || npm ci --no-audit --no-fund
	CDK_DISABLE_VERSION_CHECK=1 CDK_DISABLE_CLI_TELEMETRY=true \
		npx --no-install cdk synth --quiet --no-notices

# Re-pin every dependency from a fresh resolve of pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	.lock-venv/bin/pip freeze --exclude-editable > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
