# Set-up and run commands. Each target creates .venv when missing, installs torch first (the CPU wheel
# pinned in TORCH, so pip never pulls a CUDA build), then fastflow in editable mode with its C++
# extension, and is idempotent: the install reruns only when the build inputs change.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastflow-installed
BUILD_INPUTS := pyproject.toml CMakeLists.txt $(wildcard csrc/*)

.PHONY: install test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install "scikit-build-core>=0.10" "pybind11>=2.12" ninja
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/fastflow demo

bench: $(STAMP)
	$(PY) -m pip install -e ".[bench]" --no-build-isolation
	$(PY) -m pytest bench/ --benchmark-only -s

clean:
	rm -rf build $(VENV) fastflow-demo.png
