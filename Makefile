# The two commands that matter, each doing its own set-up from a fresh clone:
#
#   make serve       install lowvox into .venv, check that it speaks, run the server
#   make test        install what the tests need into .venv, type-check, run the whole suite (CI)
#
# and, once set up:
#
#   make test-fast   the fast tier (what plain `pytest` runs; ~1.7 minutes on 2 cores of
#                    an AMX Xeon, where it took 3.2 before the scheduling tests got a narrow
#                    vocoder; expect ~2.5x that on an AVX2-only Zen 1 EPYC)
#   make lint        ruff (lint and format check, the pre-commit hooks) and mypy (lowvox/)
#
# Set-up is idempotent: each step leaves a stamp in the venv and reruns only when
# pyproject.toml changes. Variables (`make serve TORCH=cuda SERVE_ARGS="--port 9000"`):
#
#   TORCH=cpu        PyTorch's CPU build (default). A plain `torch` requirement would pull the
#                    multi-GB CUDA build, so the CPU one is installed first, explicitly.
#   TORCH=cuda       the CUDA build: TORCH_INDEX picks its wheel index (default cu126).
#   TORCH=keep       leave torch alone (you installed the build you want yourself).
#   VENV=.venv       where to install; PYTHON=python3 the interpreter that makes it.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cu126
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
SERVE_ARGS ?=

BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: serve test test-fast lint setup setup-dev

serve: setup
	$(BIN)/lowvox say "lowvox is installed and speaking." -o $(VENV)/hello.wav
	@echo "lowvox: set-up OK, it speaks ($(VENV)/hello.wav). Starting the server; Ctrl-C stops it."
	$(BIN)/lowvox serve $(SERVE_ARGS)

test: setup-dev
	$(BIN)/mypy
	$(PY) -m pytest -q --run-slow $(PYTEST_ARGS)
	@echo "lowvox: the whole test suite passed."

test-fast: setup-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)
	@echo "lowvox: the fast tier passed (the whole suite is 'make test')."

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

setup: $(VENV)/.lowvox-installed
setup-dev: $(VENV)/.lowvox-dev-installed

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-installed: | $(PY)
	@if [ "$(TORCH)" = cpu ]; then \
		$(PIP) install -q --retries 1 "torch==$(TORCH_VERSION)" --extra-index-url "$(TORCH_CPU_INDEX)"; \
	elif [ "$(TORCH)" = cuda ]; then \
		$(PIP) install -q "torch==$(TORCH_VERSION)" --index-url "$(TORCH_INDEX)"; \
	elif [ "$(TORCH)" != keep ]; then \
		echo "TORCH must be cpu, cuda or keep (got '$(TORCH)')"; exit 2; \
	fi
	@touch $@

$(VENV)/.lowvox-installed: pyproject.toml $(VENV)/.torch-installed
	$(PIP) install -q -e .
	@$(PY) -c "import torch; print('lowvox installed with torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
	@touch $@

$(VENV)/.lowvox-dev-installed: pyproject.toml $(VENV)/.lowvox-installed
	$(PIP) install -q -e ".[dev,ray]"
	bash scripts/test-deps.sh
	@touch $@
