# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test` (the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: demo test fuzz lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps clip-anytorch==2.6.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/clipdalle pipeline --preset demo --out $(OUT) $(if $(FRESH),--fresh,)

LINTED := src tests $(wildcard benchmarks)

test: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/python -m pytest

# The HTTP API fuzzed from its OpenAPI schema with more examples than `make test` draws (see the test's docstring).
fuzz: $(STAMP)
	FUZZ_EXAMPLES=250 $(BIN)/python -m pytest tests/serve/test_serve_fuzz.py -q -s

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)

format: $(STAMP)
	$(BIN)/ruff format $(LINTED)
	$(BIN)/ruff check --fix $(LINTED)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
