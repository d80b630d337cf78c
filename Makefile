# Two commands on a fresh machine (Python >= 3.11 and pip, no root):  make demo  /  make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("gpufleet needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch, pinned. On Linux x86_64, PyPI's torch is the CUDA build and brings gigabytes of
	# nvidia-* wheels: take torch from PyTorch's CPU index when it answers (its +cpu build wins over PyPI's), else
	# the pinned version from the default index. Not quiet: the download is large, and its progress shows.
	if $(BIN)/python -c 'import urllib.request; urllib.request.urlopen("$(TORCH_CPU_INDEX)/torch/", timeout=10)' \
	     2>/dev/null; then \
	  $(BIN)/python -m pip install --extra-index-url $(TORCH_CPU_INDEX) $(TORCH); \
	else \
	  echo "PyTorch's CPU index is out of reach: $(TORCH) from the default index"; \
	  $(BIN)/python -m pip install $(TORCH); \
	fi
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
