# The README's two commands: `make demo` (run guardproxy, nothing else needed) and `make test`.
#
# Every install goes through a committed lock (requirements/*.lock, exact versions with hashes), so a
# fresh machine gets the set the suite passed on, not whatever was released last night. `make lock`
# refreshes the locks from pyproject.toml's ranges; `make test-latest` tries the newest versions those
# ranges allow, in a venv of its own.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
# guardproxy itself, from the checkout, with the locked setuptools (no build isolation: nothing unlocked
# is fetched to build it).
INSTALL_SELF := $(PIP) install --quiet --no-deps --no-build-isolation -e .
UV_VERSION := 0.13.9
LOCK := $(BIN)/uv pip compile pyproject.toml requirements/build.in --quiet --generate-hashes --universal \
	--python-version 3.11 --no-header

.PHONY: venv venv-test run demo test test-latest lint lock bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What `guardproxy serve` and `guardproxy demo` need, and nothing else.
$(VENV)/.runtime: requirements/runtime.lock pyproject.toml | $(BIN)/python
	$(PIP) install --quiet --require-hashes --no-deps -r requirements/runtime.lock
	$(INSTALL_SELF)
	@touch $@

# The runtime, the otel extra and the test and lint tools.
$(VENV)/.test: requirements/test.lock pyproject.toml | $(BIN)/python
	$(PIP) install --quiet --require-hashes --no-deps -r requirements/test.lock
	$(INSTALL_SELF)
	@touch $@ $(VENV)/.runtime

venv: $(VENV)/.runtime
venv-test: $(VENV)/.test

# Serve the example proxy.yaml on the embedded store (no Redis, no API key needed to start).
run: venv
	$(BIN)/guardproxy serve --config proxy.yaml

demo: venv
	$(BIN)/guardproxy demo

lint: venv-test
	$(BIN)/ruff check guardproxy tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/mkdocs build --strict --quiet

# The suite in 3 processes (pytest-xdist): most tests wait on subprocesses and sockets, so 3 workers
# keep 2 cores busy. The slow tests with bounds on time run one at a time, from the start, in the first
# worker (tests/conftest.py: not --dist loadgroup, which pytest 9.2 leaves ungrouped: pytest-xdist#1386).
PYTEST_WORKERS := -n 3 --dist worksteal

# Lint, type-check, check the layers (.importlinter), build the manual (strict: no broken links), then the whole suite (it starts its own redis-server and fake upstreams).
test: lint
	$(BIN)/pytest $(PYTEST_WORKERS)

# The suite on the newest versions pyproject.toml allows (not the lock): an upgrade tried on purpose.
# Its venv is .venv-latest, made anew each time.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	.venv-latest/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/versions.txt
	@echo "test-latest: versions in .venv-latest/versions.txt"
	.venv-latest/bin/pytest $(PYTEST_WORKERS)

# Refresh both locks from pyproject.toml's ranges (newest allowed versions); review the diff, then
# `make test` before committing it.
lock: | $(BIN)/python
	$(PIP) install --quiet uv==$(UV_VERSION)
	$(LOCK) --extra test -o requirements/test.lock
	$(LOCK) --extra demo -c requirements/test.lock -o requirements/runtime.lock

# Side by side against bare pass-throughs (and LiteLLM when installed) on a canned nginx upstream
# (~12 min; needs nginx-light, wrk, redis-server). bench-quick: one short round, to see that it runs.
# COMPARE=main: also guardproxy on that git revision's code, in the same rounds (before/after).
bench: venv-test
	$(BIN)/python bench/run.py $(if $(COMPARE),--compare $(COMPARE))

bench-quick: venv-test
	$(BIN)/python bench/run.py --quick $(if $(COMPARE),--compare $(COMPARE))

clean:
	rm -rf $(VENV) .venv-latest build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
