# The commands people type. `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine's CPU build of torch; the package itself accepts any torch >= 2.2 (pyproject.toml).
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint format bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/fewstep demo

test: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -p no:cacheprovider tests

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: setup
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench
