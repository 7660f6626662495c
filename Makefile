# Two entry points, both self-contained on a bare machine: `make test` and `make bench`.
PYTHON ?= python3
VENV ?= .venv
# An active virtual environment is used as it is, not a second one made beside it.
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Hypothesis profile: ci (bounded, the default), dev (larger), gpu.
HYPOTHESIS_PROFILE ?= ci

.PHONY: help test test-slow bench lint format compat clean
.DEFAULT_GOAL := help

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: where that build is on disk (a CPU wheel) nothing large is downloaded; elsewhere
# fall back to the registry's default build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test,st,bench,quality]"
	touch $@

test: $(STAMP)  ## set up .venv and run the test suite (CI's command; kernels under the interpreter on CPU)
	SAMTONE_REQUIRE_OPTIONAL=1 HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(PY) -m pytest -q

test-slow: $(STAMP)  ## the long sweeps CI skips: the tests marked slow, with Hypothesis's dev profile
	SAMTONE_REQUIRE_OPTIONAL=1 HYPOTHESIS_PROFILE=dev $(PY) -m pytest -q -m "slow or not slow"

# ruff, configured in pyproject.toml ([tool.ruff]); CI runs it after the tests.
# Pinned: another ruff release may format differently, and `ruff format --check` would then fail.
RUFF_VERSION ?= 0.17.6
$(VENV)/bin/ruff: | $(PY)
	$(PY) -m pip install -q "ruff==$(RUFF_VERSION)"

lint: $(VENV)/bin/ruff  ## ruff check and ruff format --check (CI runs it after the tests)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/bin/ruff  ## ruff format the tree
	$(VENV)/bin/ruff format .

# The dependency floors, tested: the kernel tests and the GPU compile check in a second environment
# with an older triton (3.6.0: what torch 2.11 and the lent GPU machines use; its interpreter needs
# numpy < 2.4). Not part of `make test` (a second environment and a triton download; 2 min of
# tests on the 2-core machine; the last run is in bench/RESULTS.md).
COMPAT_VENV ?= .venv-compat
COMPAT_TRITON ?= 3.6.0
COMPAT_TESTS ?= tests/test_triton.py tests/test_autotune.py tests/test_hybrid.py tests/test_choice.py tests/test_gpu_compile.py \
	tests/test_api.py
compat:  ## the kernel tests and the GPU compile check with the oldest triton promised (3.6)
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q "torch==2.13.0" "triton==$(COMPAT_TRITON)" "numpy<2.4" \
		"pytest>=8" "hypothesis>=6.100"
	$(COMPAT_VENV)/bin/python -m pip install -q --no-deps -e .
	SAMTONE_REQUIRE_OPTIONAL=0 HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(COMPAT_VENV)/bin/python -m pytest -q \
		$(COMPAT_TESTS)

bench: $(STAMP)  ## set up .venv and run the speed benchmark (python -m bench.speed; BENCH_ARGS="--quick")
	$(PY) -m bench.speed $(BENCH_ARGS)

clean:  ## remove the virtual environments and caches
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache .hypothesis
