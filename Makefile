# Every target sets up .venv itself, so `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this disk; a machine with an NVIDIA GPU keeps the torch it has or
# gets the default (CUDA) build.
TORCH_CPU := torch==2.13.0

.PHONY: setup demo test lint bench bench-cpu clean

# setuptools prints a boxed "Editable installation" notice for every editable install: advice about import
# shadowing, not a fault, so setup leaves that one message out (every other warning still shows).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install --quiet torch; \
	else \
		$(BIN)/pip install --quiet $(TORCH_CPU); \
	fi
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/fengshen-batch demo

test: setup
	$(BIN)/ruff check fengshen_batch tests benchmarks examples
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check fengshen_batch tests benchmarks examples
	$(BIN)/ruff format --check fengshen_batch tests benchmarks examples

bench: setup
	$(BIN)/python benchmarks/bench.py --device cuda

bench-cpu: setup
	$(BIN)/python benchmarks/bench.py --device cpu

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
