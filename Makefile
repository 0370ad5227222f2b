# Set-up and run commands. Every target creates .venv when missing, installs torch first (the pinned
# $(TORCH), the CPU wheel here, so pip never pulls a CUDA build for the project's `torch>=2.4`), then
# fastflow in editable mode with its C++ extension. Idempotent: stamps in .venv make repeat runs skip
# the installs, and the editable install reruns (an incremental CMake build in build/) only when
# pyproject.toml, CMakeLists.txt or csrc/ change. Python edits (fastflow/, kernels/) need no reinstall.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
TORCH_STAMP := $(VENV)/.torch-installed
STAMP := $(VENV)/.fastflow-installed
BENCH_STAMP := $(VENV)/.fastflow-bench-installed
BUILD_INPUTS := pyproject.toml CMakeLists.txt $(wildcard csrc/*)

.PHONY: venv install test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(TORCH_STAMP): | $(PY)
	$(PY) -m pip install "$(TORCH)"
	touch $@

# --no-build-isolation: the CMake cache in build/ must keep pointing at the same pybind11 and
# scikit-build-core (isolated builds use a fresh temporary environment each time).
$(STAMP): $(TORCH_STAMP) $(BUILD_INPUTS)
	$(PY) -m pip install "scikit-build-core>=0.10" "pybind11>=2.12" ninja
	command -v cmake >/dev/null || $(PY) -m pip install "cmake>=3.18"
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $@

# torchcfm without its dependencies: its flow matchers need only torch and POT (the bench extra), while its
# torchdyn requirement pulls an unpinned torchvision (and with it another torch).
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --no-build-isolation -e ".[test,bench]"
	$(PY) -m pip install --no-deps "torchcfm==1.0.7"
	touch $@

venv: $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/fastflow demo

bench: $(BENCH_STAMP)
	$(PY) -m pytest bench/ --benchmark-only -q -s

clean:
	rm -rf build $(VENV) fastflow-demo.png
