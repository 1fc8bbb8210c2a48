# Two entry points; both install the project into .venv first (works on a fresh machine).
# The install compiles the model's hot modules with mypyc (about 1.5 min, once per change);
# MEMSLOT_PURE_PYTHON=1 skips that and gives the same behaviour, slower.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: run test dev lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

run: $(BIN)/python
	$(PIP) .
	$(BIN)/memslot replay examples/vmm-boot.jsonl

test: $(BIN)/python
	$(PIP) '.[test]'
	$(BIN)/python -m pytest -q -rs
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/python -m mypy

# An editable, uncompiled install for working on the code (edits take effect at once).
dev: $(BIN)/python
	MEMSLOT_PURE_PYTHON=1 $(PIP) -e '.[test]'

bench: $(BIN)/python
	$(PIP) .
	$(BIN)/python bench/bench_memslots.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
