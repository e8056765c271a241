# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing, installs torch==2.13.0 first (the CPU wheel on disk; a
# looser spec would pull a multi-GB CUDA build), then the package with the extras it needs.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
DATA   ?= ../shared/data

# Benchmarks run inside benchmarks/, so results and cached checkpoints land in
# benchmarks/results (where the committed results are), whatever the data path's form.
BENCH = export OFFRAMP_DATA="$$(realpath -m "$${OFFRAMP_DATA:-$(DATA)}")" && cd benchmarks && \
	$(abspath $(PY))

.PHONY: demo test test-slow lint format docs-images bench bench-strategies bench-runtime bench-widths bench-placement bench-families bench-tiers clean

$(BIN)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	touch $@

$(BIN)/.deps-demo: pyproject.toml $(BIN)/.torch
	$(PIP) install -e '.[all]'
	touch $@

$(BIN)/.deps-dev: pyproject.toml $(BIN)/.torch
	$(PIP) install -e '.[all,dev]'
	touch $@ $(BIN)/.deps-demo

demo: $(BIN)/.deps-demo
	$(BIN)/offramp demo --json results/demo.json --plot results/demo.png

test: $(BIN)/.deps-dev
	OFFRAMP_DATA=$${OFFRAMP_DATA:-$(DATA)} $(PY) -m pytest -m "not slow" -q src tests

# the slow tests include the Ray Serve tier: the heavy ray extra is installed for them only
$(BIN)/.deps-ray: pyproject.toml $(BIN)/.deps-dev
	$(PIP) install -e '.[all,dev,ray]'
	touch $@

test-slow: $(BIN)/.deps-ray
	OFFRAMP_DATA=$${OFFRAMP_DATA:-$(DATA)} $(PY) -m pytest -m slow -q tests

lint: $(BIN)/.deps-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(BIN)/.deps-dev
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# The pictures in README.md and docs/: each made by the command a user runs.
IMAGES := docs/images
docs-images: $(BIN)/.deps-demo
	mkdir -p $(IMAGES) results/docs-images
	$(BIN)/offramp demo --quiet --json results/docs-images/demo.json --plot $(IMAGES)/demo.png
	$(BIN)/offramp train configs/train_digits_joint.yaml --quiet --epochs 20 \
		--output-dir results/docs-images/train
	$(BIN)/offramp evaluate results/docs-images/train
	cp results/docs-images/train/analysis/pareto.png $(IMAGES)/pareto.png
	$(BIN)/offramp calibrate results/docs-images/train --target-drop 0.5
	cp results/docs-images/train/analysis/calibrate.png $(IMAGES)/calibrate.png
	$(BIN)/offramp place configs/place_digits_resnet.yaml --quiet \
		--output-dir results/docs-images/place
	cp results/docs-images/place/placement.png $(IMAGES)/placement.png

bench: $(BIN)/.deps-dev
	$(BENCH) branchynet_mnist.py --json results/branchynet_mnist.json

bench-strategies: $(BIN)/.deps-dev
	$(BENCH) strategies.py --json results/strategies.json

bench-runtime: $(BIN)/.deps-dev
	$(BENCH) runtime.py --json results/runtime.json

bench-widths: $(BIN)/.deps-dev
	$(BENCH) widths.py --json results/widths.json

bench-placement: $(BIN)/.deps-dev
	$(BENCH) placement.py --json results/placement.json

bench-families: $(BIN)/.deps-dev
	$(BENCH) families.py --json results/families.json

bench-tiers: $(BIN)/.deps-dev
	$(BENCH) tiers.py --json results/tiers.json

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
