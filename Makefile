# All set-up happens here, so a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-2.13.0
TORCH := torch==2.13.0

.PHONY: install test test-fast demo bench replicate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)          # pin torch first: the local CPU wheel
	$(BIN)/python -m pip install -q -e '.[test,hf]' $(TORCH)
	$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'torch was replaced: ' + v)"
	touch $@

# pytest-xdist: one worker per core (at most 4); conftest.py splits the threads between them
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 -m "not slow"

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

replicate: $(STAMP)
	$(BIN)/python benchmarks/replicate.py

clean:
	rm -rf $(VENV) runs .cache
