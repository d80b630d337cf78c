# Two commands on a fresh machine (Python >= 3.11 and pip, no root):  make demo  /  make test
# Both install the locked versions of requirements/ (hashes checked), never whatever is newest on the day.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check
# pip itself is pinned: the lock is read by it, and a new pip must not change what a fresh clone gets.
PIP_VERSION := 26.3
PIP_TOOLS   := pip-tools==7.7.0
TORCH  := $(shell cat requirements/torch.txt)
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# One -n per xdist worker: the suite mostly waits on servers and processes, so more workers than cores pay off.
TEST_WORKERS ?= 6

.PHONY: demo test test-chaos check lint format bench gpu-check lock clean

# The virtualenv, its pinned pip, and the CPU build of torch (pinned in requirements/torch.txt). On Linux x86_64,
# PyPI's torch is the CUDA build and brings gigabytes of nvidia-* wheels: take torch from PyTorch's CPU index when
# it answers (its +cpu build wins over PyPI's), else the pinned version from the default index. Its dependencies are
# in the lock; torch itself is not, as its CPU build comes from another index than the rest.
$(VENV)/.torch: requirements/torch.txt
	$(PYTHON) -c 'import sys; sys.exit("gpufleet needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	@echo "== virtualenv $(VENV), pip $(PIP_VERSION)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar on pip==$(PIP_VERSION)
	@echo "== $(TORCH), CPU build (the largest download)"
	if $(BIN)/python -c 'import urllib.request; urllib.request.urlopen("$(TORCH_CPU_INDEX)/torch/", timeout=10)' \
	     2>/dev/null; then \
	  $(PIP) install --no-deps --extra-index-url $(TORCH_CPU_INDEX) $(TORCH); \
	else \
	  echo "PyTorch's CPU index is out of reach: $(TORCH) from the default index"; \
	  $(PIP) install --no-deps $(TORCH); \
	fi
	touch $@

# $(call locked,FILE): the locked packages of FILE, then the project, with no dependencies of its own to resolve and
# its build backend (setuptools) from the lock: nothing is left to pick a version on the day. Compiled as installed
# (24 s of a 40 s install): with PYTHONDONTWRITEBYTECODE set, as on the CI machine, nothing is compiled later, and
# every process would compile what it imports again (the suite took 16 min instead of 9).
define locked
	@echo "== the locked packages of $(1)"
	$(PIP) install --require-hashes -r $(1)
	@echo "== gpufleet, editable"
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PIP) check
endef

# What the demo needs, and nothing to test with.
$(VENV)/.demo: $(VENV)/.torch requirements/demo.txt pyproject.toml
	$(call locked,requirements/demo.txt)
	touch $@

# The demo's set plus the test tools: requirements/dev.txt holds all of it.
$(VENV)/.dev: $(VENV)/.torch requirements/dev.txt pyproject.toml
	$(call locked,requirements/dev.txt)
	touch $@ $(VENV)/.demo

demo: $(VENV)/.demo
	$(BIN)/gpufleet demo

# Three runs: every test but the chaos tests and those that assert a bound in time, on xdist workers (each with
# servers of its own); then the two chaos tests side by side, with the lint beside them (they leave most of the
# machine idle: they wait on kills and leases); then the timed ones alone, on a machine nobody else loads (two at a
# time, one ran beside the chaos test and missed its bound). The last two collect only the files that hold them.
CHAOS_TESTS  = $(shell grep -l 'mark\.chaos' tests/*/test_*.py)
SERIAL_TESTS = $(shell grep -l 'mark\.serial' tests/*/test_*.py)
test: $(VENV)/.dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not serial and not chaos"
	$(MAKE) --no-print-directory --output-sync=target -j 2 lint test-chaos
	$(BIN)/python -m pytest -m serial $(SERIAL_TESTS)

test-chaos: $(VENV)/.dev
	$(BIN)/python -m pytest -n 2 -m chaos $(CHAOS_TESTS)

# The inner loop: tests/unit, which start no server (no Redis, Kafka, S3, RabbitMQ or fleet), in well under a minute.
check: $(VENV)/.dev
	$(BIN)/python -m pytest -n 2 -q tests/unit

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench workers
	$(BIN)/ruff format --check src tests bench workers
	$(BIN)/mypy

format: $(VENV)/.dev
	$(BIN)/ruff format src tests bench workers
	$(BIN)/ruff check --fix src tests bench workers

bench: $(VENV)/.dev
	$(BIN)/python bench/run.py

# gpufleet on this machine's NVIDIA GPUs, as one table (bench/gpu_check.py); without a GPU it says so and exits 0.
# REHEARSE=1 runs it on a fake NVML GPU and torch's CPU device.
gpu-check: $(VENV)/.dev
	$(BIN)/python bench/gpu_check.py $(if $(REHEARSE),--rehearse)

# Re-resolve requirements/ from pyproject.toml's ranges, keeping today's pins where they still fit; UPGRADE=1 takes
# the newest that fit. demo.txt is constrained by dev.txt, so both hold the same versions.
LOCK_FLAGS := --generate-hashes --strip-extras --all-build-deps --no-emit-index-url --no-emit-find-links \
	--no-emit-trusted-host --unsafe-package torch --unsafe-package gpufleet -c requirements/torch.txt \
	$(if $(UPGRADE),--upgrade)
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q pip==$(PIP_VERSION) $(PIP_TOOLS)
	.venv-lock/bin/pip-compile $(LOCK_FLAGS) --extra local --extra torch --extra dev -o requirements/dev.txt \
		pyproject.toml
	.venv-lock/bin/pip-compile $(LOCK_FLAGS) --extra local --extra torch -c requirements/dev.txt \
		-o requirements/demo.txt pyproject.toml

clean:
	rm -rf $(VENV) .venv-lock .gpufleet .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
