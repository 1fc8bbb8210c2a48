# Two entry points; both install the project into .venv first (works on a fresh machine).
# The install compiles the model's hot modules with mypyc (about 1.5 min); it is redone only
# when a source file changed (the .installed-* stamps). MEMSLOT_PURE_PYTHON=1 skips the
# compilation and gives the same behaviour, slower.
PYTHON ?= python3
VENV ?= .venv
PURE_VENV ?= .venv-pure
BIN := $(VENV)/bin
PIP := -m pip install -q --disable-pip-version-check
SOURCES := pyproject.toml setup.py $(shell find src -name '*.py' -o -name 'py.typed' -o -path '*/data/*' -type f)

.PHONY: run test test-pure dev lint bench clean deps-record deps-bench lab-deps matrix docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: $(SOURCES) | $(BIN)/python
	$(BIN)/python $(PIP) .
	touch $@

$(VENV)/.installed-test: $(SOURCES) | $(BIN)/python
	$(BIN)/python $(PIP) '.[test]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/memslot replay examples/vmm-boot.jsonl

test: $(VENV)/.installed-test deps-record
	$(BIN)/python -m pytest -q -rs
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/python -m mypy

# The same suite on the uncompiled build (CI runs both; the behaviour must not differ).
$(PURE_VENV)/.installed-test: $(SOURCES)
	$(PYTHON) -m venv $(PURE_VENV)
	MEMSLOT_PURE_PYTHON=1 $(PURE_VENV)/bin/python $(PIP) '.[test]'
	touch $@

test-pure: $(PURE_VENV)/.installed-test deps-record
	$(PURE_VENV)/bin/python -m pytest -q -rs

# `memslot record` runs VMMs under strace; its end-to-end test records QEMU. Debian packages,
# installed with apt-get when missing (as root); elsewhere a note, and those tests skip.
RECORD_DEBS := strace qemu-system-x86
deps-record:
	@missing=$$(for p in $(RECORD_DEBS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "deps-record: installing $$missing"; \
	    apt-get update -qq -o DPkg::Lock::Timeout=600 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
	        --no-install-recommends $$missing >/dev/null; \
	else \
	    echo "deps-record: missing $$missing (install as root with apt-get; the memslot record tests skip)"; \
	fi

# An editable, uncompiled install for working on the code (edits take effect at once).
dev: $(BIN)/python
	$(BIN)/python $(PIP) -e '.[test]'
	rm -f $(VENV)/.installed-run $(VENV)/.installed-test

bench: $(VENV)/.installed-run
	$(BIN)/python bench/bench_memslots.py

# bench/bench_model_instructions.py counts instructions with valgrind's callgrind.
deps-bench:
	@command -v valgrind >/dev/null && exit 0; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq -o DPkg::Lock::Timeout=600 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
	        --no-install-recommends valgrind >/dev/null; \
	else \
	    echo "deps-bench: valgrind missing (install it as root with apt-get)"; \
	fi

# The kernel lab's host side: QEMU for every emulated architecture (TCG, no host KVM needed),
# the RISC-V firmware, and what apt and the image builder use (see README, "The kernel lab").
LAB_PACKAGES := qemu-system-x86 qemu-system-arm qemu-system-misc qemu-system-ppc opensbi \
	seabios gpgv debian-archive-keyring zstd
lab-deps:
	@missing=$$(for p in $(LAB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi

# The proof on every bootable kernel (docs/kernel-matrix.md; hours of emulation). Raw results
# per target land in $(LAB_RESULTS).
LAB_RESULTS ?= $(HOME)/.cache/memslot/lab-results
matrix: lab-deps $(VENV)/.installed-run
	$(BIN)/memslot lab matrix --jobs 2 --out docs/kernel-matrix.md --results $(LAB_RESULTS)

# The generated table of docs/kernel-versions.md, from memslot.versions.CHANGES.
docs: $(VENV)/.installed-run
	$(BIN)/python -c 'from memslot.versions import update_docs; update_docs("docs/kernel-versions.md")'

clean:
	rm -rf $(VENV) $(PURE_VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
	find src -name '*.so' -delete
	find src -name '__pycache__' -type d -prune -exec rm -rf {} +
