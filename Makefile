# One entry point per job. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test lint format clean serve

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU build available offline here; other versions pull GBs.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train,serve,dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

# The inference service on the default bundles (weights/ner, weights/re); IMM_* variables configure it.
serve: $(STAMP)
	$(PY) -m service

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
