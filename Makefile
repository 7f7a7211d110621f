# longreach: two commands for a newcomer — `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The working directory must never shadow longreach.kernels / longreach.parallel (ARCHITECTURE.md §7).
export PYTHONSAFEPATH := 1
# Without a GPU: the CPU build of torch 2.13.0 (a local/mirrored 2.13.0+cpu wheel if pip's configured
# sources have one, else PyTorch's CPU index), so nothing pulls a multi-GB CUDA build (PyPI's default
# Linux wheel is the CUDA one). With a GPU: PyPI's default (CUDA) torch.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INSTALL ?= $(if $(HAS_GPU),$(PIP) install -q "$(TORCH_SPEC)",$(PIP) install -q "torch==2.13.0+cpu" || $(PIP) install -q --index-url $(CPU_INDEX) "torch==2.13.0")
# Strict editable installs are a link farm: re-install when the module list changes.
MODULES := $(shell find framework parallel kernels launchers configs -name '*.py' -o -name '*.yaml' 2>/dev/null | LC_ALL=C sort | md5sum | cut -c1-16)
STAMP := $(VENV)/.longreach-$(MODULES)

.PHONY: install demo test test-fast wheel-check gpu-check clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# torch first (from the CPU index when there is no GPU); the project install then finds it satisfied.
$(VENV)/.deps: pyproject.toml setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || { $(TORCH_INSTALL); }
	$(PIP) install -q "$(TORCH_SPEC)" -e ".[dev,hf]" --config-settings editable_mode=strict
	$(PIP) install -q --no-deps "yunchang==0.6.4" || echo "yunchang not installed: bench cp --peers will skip its rows"
	# a peer of `longreach bench cp --peers`, pure Python: --no-deps keeps this torch and pulls no flash-attn
	$(PIP) install -q --no-deps "yunchang==0.6.4" || echo "yunchang not installed: bench cp --peers will skip its rows"
	touch $@

$(STAMP): $(VENV)/.deps
	rm -f $(VENV)/.longreach-*
	$(PIP) install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	touch $@

install: $(STAMP)

# 2 CPU processes (torchrun, gloo) train the tiny demo model into runs/demo/.
demo: install
	$(VENV)/bin/longreach demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider tests -m "not slow"

# Build the wheel, unpack it into a scratch folder and import every module from there.
wheel-check: install
	$(PY) -m pytest -q -p no:cacheprovider tests/test_packaging.py

# On a machine with one GPU (< 8 min): gpu tests, 1B Llama tokens/s and MFU at 16k/64k, mask kernels at 32k.
gpu-check: install
	$(VENV)/bin/longreach bench gpu --json gpu_check.json

clean-venv:
	rm -rf $(VENV)
