# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv on first use with the pinned development requirements.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/memkv demo

lint: $(STAMP)
	$(BIN)/ruff check lmcache_memkv tests benchmarks
	$(BIN)/mypy

test: lint
	LMCACHE_TRACK_USAGE=false LMCACHE_DISABLE_BANNER=1 $(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/node_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
