# The two commands a newcomer needs:  make run  /  make test
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test check clean

$(VENV)/.run: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[fast]'
	touch $@

$(VENV)/.dev: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.run

# Run the mirror: Docker Hub upstream, cache in ./pullthrough-cache, port 5000.
run: $(VENV)/.run
	$(VENV)/bin/pullthrough serve $(ARGS)

# Lint, type-check and run every test (installs the Debian packages they drive).
test: $(VENV)/.dev
	scripts/test-deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest

clean:
	rm -rf $(VENV) pullthrough-cache .mypy_cache .ruff_cache .pytest_cache
