# Two commands from a clean clone: `make run` (the demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned: on the project machines this picks the local CPU build; from PyPI it is the CUDA
# build of the same release. pyproject keeps the range open for users.
TORCH ?= torch==2.13.0

.PHONY: setup run test lint clean

setup: $(VENV)/.installed

# pip byte-compiles one file at a time, most of the install time; compileall does the same
# on every core. The bytecode must be there: where PYTHONDONTWRITEBYTECODE is set, nothing
# else writes it, and every pool's forkserver would compile torch from source. (A few
# third-party files are written for other Python versions and do not compile: not an error.)
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile "$(TORCH)"
	$(PY) -m pip install -q --no-compile -e ".[test]"
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

run: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/pool demo

# Three test processes: most of an end-to-end test is waiting on real pools (loads, drains,
# grace periods), so on 2 cores three at once take ~5.5 min where one at a time takes ~9.
TEST_PROCESSES ?= 3

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -n $(TEST_PROCESSES)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
