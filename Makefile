# One command each: `make demo` sets up and folds a sample model; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-test demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# bnfold itself: numpy, onnx, onnxruntime, click, ml_dtypes. No torch, no onnxsim.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# The tests also need torch (sample generator, PyTorch side). torch==2.13.0 first: a CPU build that installs from
# local disk here; a looser pin would pull a multi-GB CUDA build.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,export]"
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

demo: setup
	$(BIN)/bnfold sample_models/resnet_small.onnx sample_models/resnet_small.folded.onnx

test: setup-test
	$(BIN)/python -m pytest -q

bench: setup-test
	$(BIN)/python benchmarks/fold_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis sample_models/*.folded.onnx benchmarks/_work
