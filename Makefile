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

.PHONY: install demo test lint typecheck unit integration e2e test-slow test-py313 test-oldest coverage lock ui clean synth bench

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dagster-taskiq demo

ui: $(STAMP)
	$(BIN)/dagster-taskiq ui

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# Test files run four at a time on any machine (a file's tests stay together: some share one
# local stack). The end-to-end tests mostly wait on leases and redeliveries, not on the
# processor: on 2 cores, four at a time take about 205 s of pytest where two take 265 s.
TEST_WORKERS ?= 4
XDIST := -n $(TEST_WORKERS) --dist loadfile

test: lint typecheck
	$(BIN)/pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

# One tier at a time: unit (no services), integration (PostgreSQL, moto, CDK synth) and
# end-to-end (real runs on real worker processes).
unit: $(STAMP)
	$(BIN)/pytest -m "not slow" tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/pytest -m "not slow" $(XDIST) tests/integration tests/cdk $(PYTEST_ARGS)

e2e: $(STAMP)
	$(BIN)/pytest -m "not slow" $(XDIST) tests/e2e $(PYTEST_ARGS)

# The same suite as `make test` with coverage, the worker and step processes included: a
# summary of what is not fully covered, and build/coverage/index.html.
coverage: $(STAMP)
	rm -f .coverage .coverage.*
	$(BIN)/pytest -m "not slow" $(XDIST) --cov --cov-report=term:skip-covered \
		--cov-report=html:build/coverage $(PYTEST_ARGS)

# Long fault runs (marked `slow`); pytest's exit code 5 means none are collected yet.
test-slow: $(STAMP)
	$(BIN)/pytest -m slow $(PYTEST_ARGS) || test $$? -eq 5

# The unit and integration tiers again on Python 3.13 (PYTHON313: that interpreter; with
# pyenv, the newest 3.13 it has). pgserver has no 3.13 wheel, so this virtualenv's Python
# starts the embedded PostgreSQL and the 3.13 one runs the tests against it.
PYTHON313 ?= $(shell command -v pyenv >/dev/null 2>&1 && v=$$(pyenv versions --bare | grep -E '^3\.13' | tail -n 1) && test -n "$$v" && echo "$$(pyenv root)/versions/$$v/bin/python3.13" || command -v python3.13)
# Exported: the test that loads a Lambda bundle built for another Python runs it there.
export PYTHON313
VENV313 := .venv-3.13
STAMP313 := $(VENV313)/.installed-stamp

$(STAMP313): pyproject.toml constraints.txt
	@test -n "$(PYTHON313)" || { echo "No Python 3.13: set PYTHON313=/path/to/python3.13"; exit 1; }
	test -x $(VENV313)/bin/python || $(PYTHON313) -m venv $(VENV313)
	$(VENV313)/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP313)

test-py313: $(STAMP) $(STAMP313)
	rm -rf build/pg-py313
	$(BIN)/python -m tests.with_postgres build/pg-py313 -- \
		$(VENV313)/bin/pytest -m "not slow" tests/unit tests/integration $(PYTEST_ARGS)

# The oldest Dagster the package supports (pyproject.toml's lower bounds; patches.TESTED):
# the end-to-end tier and the contract tests of the patches again, in their own virtualenv,
# with every other library as constraints.txt pins it. --maxfail: a Dagster that moved an
# internal fails most end-to-end tests, each only at its timeout; five say enough.
OLDEST_DAGSTER := 1.13.0
OLDEST_DAGSTER_LIBRARIES := 0.29.0
VENV_OLDEST := .venv-oldest
STAMP_OLDEST := $(VENV_OLDEST)/.installed-stamp

build/constraints-oldest.txt: constraints.txt Makefile
	mkdir -p build
	sed -E \
		-e 's/^(dagster|dagster-graphql|dagster-pipes|dagster-shared|dagster-webserver)==.*/\1==$(OLDEST_DAGSTER)/' \
		-e 's/^(dagster-postgres|dagster-celery)==.*/\1==$(OLDEST_DAGSTER_LIBRARIES)/' \
		constraints.txt > $@

$(STAMP_OLDEST): pyproject.toml build/constraints-oldest.txt
	test -x $(VENV_OLDEST)/bin/python || $(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install --quiet -c build/constraints-oldest.txt -e '.[dev]'
	touch $(STAMP_OLDEST)

test-oldest: $(STAMP_OLDEST)
	$(VENV_OLDEST)/bin/python -c "import dagster; assert dagster.__version__ == '$(OLDEST_DAGSTER)', dagster.__version__"
	$(VENV_OLDEST)/bin/pytest -m "not slow" $(XDIST) --maxfail=5 tests/e2e tests/integration/test_patches.py \
		tests/unit/test_dagster_loop.py tests/unit/test_expected_steps.py $(PYTEST_ARGS)

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
	rm -rf $(VENV) $(VENV313) .mypy_cache .ruff_cache .pytest_cache
