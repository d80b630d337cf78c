# Two commands on a fresh machine (Python >= 3.11 and pip, no root):  make demo  /  make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("gpufleet needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch, pinned: an unpinned torch pulls gigabytes of CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,torch]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gpufleet demo

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench workers
	$(BIN)/ruff format --check src tests bench workers
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests bench workers
	$(BIN)/ruff check --fix src tests bench workers

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .gpufleet .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
