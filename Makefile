# The README's two commands: `make demo` (run guardproxy, nothing else needed) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv run demo test lint bench bench-quick clean

$(BIN)/guardproxy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

venv: $(BIN)/guardproxy

# Serve the example proxy.yaml on the embedded store (no Redis, no API key needed to start).
run: venv
	$(BIN)/guardproxy serve --config proxy.yaml

demo: venv
	$(BIN)/guardproxy demo

# Lint, type-check, then the whole suite (it starts its own redis-server and fake upstreams).
test: venv
	$(BIN)/ruff check guardproxy tests bench
	$(BIN)/mypy
	$(BIN)/pytest

# Side by side against bare pass-throughs (and LiteLLM when installed) on a canned nginx upstream
# (~12 min; needs nginx-light, wrk, redis-server). bench-quick: one short round, to see that it runs.
bench: venv
	$(BIN)/python bench/run.py

bench-quick: venv
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
