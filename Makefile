# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.maskloop-installed
# pip extras of the editable install: dev (pytest, ruff, selenium), serve (gradio: the web app and its browser
# test), wandb (the optional W&B logger, tested offline)
EXTRAS ?= dev,serve,wandb

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch from the local index first, so the package's range does not pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/maskloop demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q tests $(TEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check maskloop tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
