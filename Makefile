# fasttrack: every target sets itself up from nothing (a venv, torch, the build), then runs.
#   make demo   - the main job: tracker networks before/after swapping in fused layers
#   make test   - the test suite (+ every benchmark once, timing disabled)
#   make bench  - the benchmarks, providers side by side (python -m bench)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch where there is no GPU (it lies on these machines' disk).
TORCH_SPEC ?= torch==2.13.0
DEPS := triton==3.9.0 ninja pybind11 numpy pytest pytest-benchmark expecttest matplotlib
export MAX_JOBS ?= 2

.PHONY: all install build demo test bench check info aot clean

all: test

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC) $(DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/include/*/*.h)
	$(PIP) install -q --no-build-isolation -e .
	touch $@

install build: $(VENV)/.built

demo: build
	$(PY) -m fasttrack.demo $(ARGS)

test: build
	$(PY) -m pytest -q --benchmark-disable $(ARGS)

bench: build
	$(PY) -m bench $(ARGS)

check: build
	$(PY) -m fasttrack.check $(ARGS)

info: build
	$(PY) -m fasttrack.info

aot: build
	TRITON_INTERPRET=0 $(PY) -m fasttrack.kernels._aot

clean:
	rm -rf build fasttrack/_C*.so *.egg-info
