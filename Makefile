# One place for the install and test commands that README.md and .ci/run use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install dev test test-fast bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The CPU build of torch first, so that nothing pulls a CUDA build in its place.
install: $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e .

dev: install
	$(BIN)/pip install -q -e ".[dev,ray]"
	# open_clip is a parity reference only; --no-deps keeps its torchvision/timm requirements out (tests/refs.py).
	$(BIN)/pip install -q --no-deps "open_clip_torch==3.3.0"
	# k-diffusion is the samplers' parity reference (what A1111 runs); --no-deps keeps torchvision, clip and wandb
	# out: tests/test_samplers_more.py loads only its sampling.py and external.py (scipy, torchsde from [dev]).
	$(BIN)/pip install -q --no-deps "k-diffusion==0.1.1.post1"

test: dev
	$(BIN)/python -m pytest -q

test-fast: dev
	$(BIN)/python -m pytest -q -m "not slow and not browser"
