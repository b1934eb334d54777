# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both create .venv and install what they need on first use.
#
# CONSTRAINTS pins the CPU build of PyTorch on machines without CUDA. With a CUDA machine, run
# `make install CONSTRAINTS=` (no pin: pip keeps or fetches the CUDA torch you want).
# EXTRAS: the optional dependencies installed with the package; `ray` is there so that the Ray Serve
# smoke test runs (CI installs it). Where no ray wheel exists for your Python / platform, run
# `make test EXTRAS=dev`: that test is then skipped with its reason.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aptp-installed
EXTRAS ?= dev,ray
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml plugins/aptp-timm/pyproject.toml $(CONSTRAINTS) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_C) -e '.[$(EXTRAS)]'
	$(PY) -m pip install --quiet $(PIP_C) -e plugins/aptp-timm
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/aptp compare demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-json=benchmarks/results.json $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
