# Every target creates .venv on a fresh machine first. torch==2.13.0 is pinned because this machine
# installs its CPU build from local disk; elsewhere pip fetches it from PyPI.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: venv test test-all lint demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,export]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	$(PY) -m pytest -q

test-all: venv lint
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
