# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both create .venv and install what they need on first use.
#
# CONSTRAINTS pins the CPU build of PyTorch on machines without CUDA. With a CUDA machine, run
# `make install CONSTRAINTS=` (no pin: pip keeps or fetches the CUDA torch you want).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aptp-installed
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml plugins/aptp-timm/pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_C) -e '.[dev]'
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
