# Quick start on a fresh machine (Python 3.9+ with venv and a C++ compiler):
#   make bench   benchmark suite against the PyTorch reference (CPU when there is no GPU)
#   make test    test suite
# Both create .venv, install torch and the project into it (once), then run.
PYTHON ?= python3
VENV   ?= .venv
# torch to build against and run with; CPU wheel by default, override e.g. TORCH=torch==2.14.1
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cpp) setup.py pyproject.toml

.PHONY: install test sanitize bench info clean

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" numpy ninja setuptools wheel
	$(PY) -m pip install -q pytest hypothesis pytest-benchmark matplotlib tqdm
	# triton: its CPU interpreter runs the Triton kernel tests; transformers/tokenizers/safetensors: the
	# HF backend, BERT interop and MLM training tests, and the BERT benchmark's HF baselines
	$(PY) -m pip install -q triton "transformers>=4.53" tokenizers safetensors
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest tests benchmarks/test_harness.py -rs

# the CPU kernel tests and the boundary sweep against an ASan + UBSan build of the CPU extension
sanitize: $(VENV)/.installed
	bash .ci/sanitize

bench: $(VENV)/.installed
	$(PY) -m benchmarks

info: $(VENV)/.installed
	$(PY) -m fastattn.info

clean:
	rm -rf build *.egg-info fastattn/*.so
