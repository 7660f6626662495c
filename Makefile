# Two entry points, both self-contained on a bare machine: `make test` and `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Hypothesis profile: ci (bounded, the default), dev (larger), gpu.
HYPOTHESIS_PROFILE ?= ci

.PHONY: test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: where that build is on disk (a CPU wheel) nothing large is downloaded; elsewhere
# fall back to the registry's default build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test,st,bench,quality]"
	touch $@

test: $(STAMP)
	SAMTONE_REQUIRE_OPTIONAL=1 HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/speed.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
