# Two entry points: `make repro` (the pipeline) and `make test` (the suite).
# Both create .venv once from the pinned lock file and reuse it afterwards.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin

.PHONY: repro test

$(VENV)/.installed: requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

repro: $(VENV)/.installed
	PATH=$(BIN):$$PATH dvc repro

# The linter first, then the test files in parallel, each whole on one worker (a module's tests
# may build on each other), in the order tests/conftest.py gives them: the longest first. The
# slowest tests are listed at the end, where the suite's time goes.
test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PATH=$(BIN):$$PATH python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=15
