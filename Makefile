# Quickstart targets. Each one sets up .venv first (idempotent: a second run installs nothing).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench

setup:
	bash scripts/setup.sh

# The main job: the head-to-head comparison on the benchmark that decides (shapes2d "dense"; report in
# runs/compare). --resume: a second `make demo` reuses finished runs and continues a killed one, deleting nothing.
demo: setup
	$(PY) -m influencerformer compare --config configs/shapes2d_dense.yaml --criteria hungarian influencer --out runs/compare --resume

# The whole test suite (slow tests included; they fit in the CI budget).
test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m influencerformer bench
