# fasttrack: every target sets itself up from nothing (a venv, torch, the build), then runs.
#   make demo   - the main job: tracker networks before/after swapping in fused layers
#   make test   - the test suite (+ every benchmark once, timing disabled)
#   make bench  - the benchmarks, providers side by side (python -m bench)
#   make peers  - fused fasttrack vs ONNX Runtime and OpenVINO on the exported networks (python -m bench peers)
#   make lint   - ruff over the Python tree (ruff.toml), clang-format over csrc/ (.clang-format)
#   make format - apply clang-format to csrc/
#   make cmake-test       - csrc/ built by CMake against the venv's LibTorch, ctest, nvcc check of *.cu
#   make check-cuda-build - the CUDA build in a second venv (.venv-cuda, several GB of downloads)
#   make compat TORCH=2.11.0 TRITON=3.6.0 - build + suite against another torch/triton (scripts/compat.sh)
#   make asan-test - the C++ kernels under AddressSanitizer, op + fuzz tests (scripts/asan_test.sh)
#   make gpu-check [OUT=DIR] - on a GPU machine: build for its GPU, parity, device tests, sanitizer,
#                    GPU benchmarks (scripts/gpu_check.sh; uses $(PYTHON) as it is, no venv, offline)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch where there is no GPU (it lies on these machines' disk).
TORCH_SPEC ?= torch==2.13.0
DEPS := triton==3.9.0 ninja pybind11 numpy pytest pytest-benchmark expecttest matplotlib hypothesis \
	onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0 openvino==2026.4.1 ruff==0.17.5 \
	clang-format==23.1.3
# parallel compile jobs: every core (a CUDA build on a 16-core GPU machine takes ~1-1.5 min at full width)
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: all install build demo test bench peers lint format check info aot clean cmake-test check-cuda-build gpu-check compat asan-test

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

peers: build
	$(PY) -m bench peers $(ARGS)

CXX_SOURCES = $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/include/*/*.h)

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check fasttrack kernels bench tests scripts setup.py
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

format: $(VENV)/.deps
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

check: build
	$(PY) -m fasttrack.check $(ARGS)

info: build
	$(PY) -m fasttrack.info

aot: build
	TRITON_INTERPRET=0 $(PY) -m fasttrack.kernels._aot
	$(PY) -m bench traffic

CMAKE_BUILD_DIR ?= build/cmake
NVCC_FOUND := $(shell command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
cmake-test: $(VENV)/.deps
	cmake -S . -B $(CMAKE_BUILD_DIR) -DPython3_EXECUTABLE=$(abspath $(PY)) \
		-DFASTTRACK_NVCC_CHECK=$(if $(NVCC_FOUND),ON,OFF) \
		$(if $(wildcard $(CMAKE_BUILD_DIR)/CMakeCache.txt),,$(if $(shell command -v ninja),-G Ninja))
	cmake --build $(CMAKE_BUILD_DIR) -j $(MAX_JOBS)
	ctest --test-dir $(CMAKE_BUILD_DIR) --output-on-failure
	$(if $(NVCC_FOUND),cmake --build $(CMAKE_BUILD_DIR) --target cuda_compile_check,@echo "no nvcc: cuda_compile_check skipped")

check-cuda-build:
	PYTHON=$(PYTHON) bash scripts/check_cuda_build.sh

gpu-check:
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh $(OUT)

compat:
	PYTHON=$(PYTHON) TORCH=$(TORCH) TRITON=$(TRITON) NUMPY=$(NUMPY) ARGS="$(ARGS)" bash scripts/compat.sh

asan-test:
	PYTHON=$(PYTHON) ARGS="$(ARGS)" bash scripts/asan_test.sh

clean:
	rm -rf build fasttrack/_C*.so *.egg-info
