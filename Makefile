# Set-up and everyday commands. `make serve` and `make test` each build the virtual
# environment on first use (CPU torch wheel first, so pip never pulls a CUDA build here).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PORT ?= 8000

.PHONY: install serve test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

serve: install
	$(VENV)/bin/loopserve serve --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest
