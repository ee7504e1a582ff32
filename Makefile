# Quickstart targets. Each one sets up .venv first (idempotent: a second run installs nothing).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench

setup:
	bash scripts/setup.sh

# The main job: the head-to-head comparison on the embedded shapes2d set (report in runs/compare).
demo: setup
	$(PY) -m influencerformer compare --out runs/compare

# The whole test suite (slow tests included; they fit in the CI budget).
test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m influencerformer bench
