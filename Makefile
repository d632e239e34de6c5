# Quick start (each target installs and builds what it needs first; fast when already done):
#   make bench   - the main job: benchmark our fused LSTM against torch.nn.LSTM
#   make test    - the test suite
# Variables: PYTHON (interpreter that creates the venv), VENV (its folder), REQUIREMENTS,
# MAX_JOBS (parallel compile jobs), BENCH_ARGS, PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
REQUIREMENTS ?= requirements.txt
MAX_JOBS ?= 2
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
BUILT := $(VENV)/.built-extension
SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cuh csrc/*.cpp csrc/*.cu csrc/cpu/*.h csrc/cpu/*.cpp)

.PHONY: test bench build clean

test: $(BUILT)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(BUILT)
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

build: $(BUILT)

$(INSTALLED): $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(REQUIREMENTS)
	touch $@

# Rebuilds when a source changes or the compiled module is missing (ninja keeps it incremental).
$(BUILT): $(INSTALLED) $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py -q build_ext --inplace
	ls handlstm_cuda/_C*.so > /dev/null
	touch $@

clean:
	rm -rf build handlstm_cuda/_C*.so $(BUILT)
