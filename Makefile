# Two commands: `make demo` and `make test`. Both work from a fresh clone: they create .venv (reusing
# it and pip's cache when present), install devicemap with its Rust extension and test extras, then run.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deps-installed

.PHONY: demo test setup build rust-test py-test lint bench clean

demo: build
	$(BIN)/devicemap demo

test: build rust-test lint py-test

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "maturin>=1.7,<2"
	touch $(STAMP)

# Builds the Rust extension (incrementally, in target/) and installs devicemap editable with its
# dependencies and test extras from pyproject.toml; pip reuses its wheel cache.
build: setup
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(BIN)):$$PATH $(BIN)/maturin develop --release --extras test

rust-test:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace

lint: setup
	$(BIN)/ruff check python tests benches examples
	$(BIN)/ruff format --check python tests benches examples

py-test: build
	$(BIN)/python -m pytest -q

bench: build
	$(BIN)/python benches/bench_placement.py
	$(BIN)/python benches/bench_quality.py
	$(BIN)/python benches/bench_checkpoint.py
	$(BIN)/python benches/bench_stages.py

clean:
	rm -rf target $(VENV) .pytest_cache .hypothesis
