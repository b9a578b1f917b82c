# Two commands from a clean clone: `make run` (the demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned: on the project machines this picks the local CPU build; from PyPI it is the CUDA
# build of the same release. pyproject keeps the range open for users.
TORCH ?= torch==2.13.0

.PHONY: setup run test lint clean

setup: $(VENV)/.installed

# --no-compile: byte-compiling every file of torch and transformers up front is most of the
# install time (~150 s -> ~65 s); Python compiles what is imported, when it is imported.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile "$(TORCH)"
	$(PY) -m pip install -q --no-compile -e ".[test]"
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
