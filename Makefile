# One command each: `make demo` sets up and folds a sample model; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

# torch==2.13.0 first: a CPU build that installs from local disk here; a looser pin would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,export]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/bnfold sample_models/resnet_small.onnx -o sample_models/resnet_small.folded.onnx

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/fold_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis sample_models/*.folded.onnx benchmarks/_work
