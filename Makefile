# longreach: two commands for a newcomer — `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The working directory must never shadow longreach.kernels / longreach.parallel (DESIGN.md §1).
export PYTHONSAFEPATH := 1
# The CPU wheel of torch is pinned when no GPU is present, so nothing pulls a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
# Strict editable installs are a link farm: re-install when the module list changes.
MODULES := $(shell find framework parallel kernels launchers configs -name '*.py' -o -name '*.yaml' 2>/dev/null | LC_ALL=C sort | md5sum | cut -c1-16)
STAMP := $(VENV)/.longreach-$(MODULES)

.PHONY: install demo test test-fast clean-venv wheel-check

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.deps: pyproject.toml setup.py | $(PY)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "numpy" "$(TORCH_SPEC)" -e ".[dev,hf]" --config-settings editable_mode=strict
	touch $@

$(STAMP): $(VENV)/.deps
	rm -f $(VENV)/.longreach-*
	$(PIP) install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/longreach demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider tests -m "not slow"

clean-venv:
	rm -rf $(VENV)
