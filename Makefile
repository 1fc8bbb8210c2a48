# Two entry points; both install the project into .venv first (works on a fresh machine).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

run: $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e .
	$(BIN)/memslot replay examples/vmm-boot.jsonl

test: $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	$(BIN)/python -m pytest -q -rs
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/python -m mypy

bench: $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e .
	$(BIN)/python bench/bench_memslots.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
