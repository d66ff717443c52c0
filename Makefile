# Two commands: `make demo` and `make test`. Both work from a fresh clone: they create .venv (reusing
# it and pip's cache when present), install devicemap with its Rust extension and test extras, then run.

PYTHON ?= python3
VENV := .venv
# DEVICEMAP_DEPS=oldest: the same commands in .venv-oldest, with the oldest supported versions of torch,
# accelerate, transformers & co. (.ci/oldest-versions.txt, as pip constraints).
ifeq ($(DEVICEMAP_DEPS),oldest)
VENV := .venv-oldest
export PIP_CONSTRAINT := $(abspath .ci/oldest-versions.txt)
else ifneq ($(DEVICEMAP_DEPS),)
$(error DEVICEMAP_DEPS=$(DEVICEMAP_DEPS): use DEVICEMAP_DEPS=oldest, or leave it unset for the newest releases)
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.deps-installed

.PHONY: demo test setup build rust-test py-test lint bench clean

# Tests draw the same examples on every run (hypothesis derandomized, proptest seeded by .cargo/config.toml).
# DEVICEMAP_EXPLORE=1 draws new ones: a random proptest seed (printed, to replay a failure with
# PROPTEST_RNG_SEED=<seed>) and random hypothesis examples (tests/exploration.py).
ifneq ($(filter 1 true yes on,$(DEVICEMAP_EXPLORE)),)
export PROPTEST_RNG_SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif

demo: build
	$(BIN)/devicemap demo

test: build rust-test lint py-test

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "maturin>=1.9.4,<2"
	touch $(STAMP)

# Builds the Rust extension (incrementally, in target/) and installs devicemap editable with its
# dependencies and test extras from pyproject.toml; pip reuses its wheel cache.
build: setup
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(BIN)):$$PATH $(BIN)/maturin develop --release --extras test

rust-test:
	@test -z "$(DEVICEMAP_EXPLORE)" || echo "proptest seed: PROPTEST_RNG_SEED=$$PROPTEST_RNG_SEED"
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace

# Style (ruff), types (mypy, settings in pyproject.toml) and the stub of the Rust extension against the
# built binding (stubtest). They come with the test extras; installed here too so `make lint` runs alone.
lint: build
	$(BIN)/python -m pip install --quiet "ruff>=0.6" "mypy>=1.10"
	$(BIN)/ruff check python tests benches examples scripts
	$(BIN)/ruff format --check python tests benches examples scripts
	$(BIN)/python -m mypy
	$(BIN)/python -m mypy.stubtest devicemap._core

py-test: build
	$(BIN)/python -m pytest -q

# devicemap.compat against several accelerate releases (each wheel fetched once with pip into
# ~/.cache/devicemap/accelerate); DEVICEMAP_ACCELERATE_VERSIONS=1.1.1,1.16.0 picks them. Not part of `make test`.
.PHONY: compat-matrix
compat-matrix: build
	$(BIN)/python tests/compat_matrix.py

bench: build
	$(BIN)/python benches/bench_placement.py
	$(BIN)/python benches/bench_quality.py
	$(BIN)/python benches/bench_checkpoint.py
	$(BIN)/python benches/bench_stages.py
	$(BIN)/python benches/bench_speed.py
	$(BIN)/python benches/bench_startup.py
	$(BIN)/python benches/bench_cli_startup.py

# Pictures for the README: the plans as SVG and, rasterised with cairosvg (installed here if missing;
# it needs the cairo library, Debian's libcairo2), as PNG in docs/. Not part of `make test`.
PICTURES := docs/plan-llama-3-70b docs/plan-mixtral-8x7b-disk
.PHONY: pictures
pictures: build
	$(BIN)/python -c "import cairosvg" 2>/dev/null || $(BIN)/python -m pip install --quiet cairosvg
	@$(BIN)/python -c "import cairosvg" || { echo "cairosvg needs the cairo library: apt-get install libcairo2"; exit 1; }
	$(BIN)/devicemap plan llama-3-70b --gpus 4x24GiB --cpu 128GiB --dtype bf16 --out docs/plan-llama-3-70b.svg > /dev/null
	$(BIN)/devicemap plan mixtral-8x7b --gpus 2x24GiB --cpu 16GiB --disk --dtype bf16 --batch 4 --seq-len 4096 \
		--out docs/plan-mixtral-8x7b-disk.svg > /dev/null
	$(BIN)/python -c "import sys, cairosvg; [cairosvg.svg2png(url=f + '.svg', write_to=f + '.png', output_width=1920) for f in sys.argv[1:]]" $(PICTURES)

clean:
	rm -rf target .venv .venv-oldest .pytest_cache .hypothesis
