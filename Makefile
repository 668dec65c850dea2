# `make test` and `make demo` set everything up on a fresh machine (idempotent, instant when done).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast demo bench clean

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q --durations=15 tests

# Tests that start no engine (a few minutes).
test-fast: setup
	$(PY) -m pytest -q tests -m "not engine"

demo: setup
	$(PY) -m telltale_norm demo --quick

bench: setup
	$(PY) bench/overhead.py

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache
