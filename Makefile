# Two commands, each builds .venv at the repo root from scratch if needed:
#   make demo   star vs ring vs none on CPU (torchrun, 4 ranks), agreement and timings
#   make test   the test suite (CPU, gloo, real multi-rank worlds)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch first: an unpinned torch would pull multi-GB CUDA builds.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m star_mcore demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs -p no:cacheprovider

clean:
	rm -rf $(VENV) build
