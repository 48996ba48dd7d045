# `make test` and `make demo` each build the virtual environment from nothing when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers; each file's tests stay on one worker (module fixtures are built once)
TEST_WORKERS ?= 2

.PHONY: test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build on disk, never a CUDA build from PyPI.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	$(PY) -m vlm2vec_jax.demo

bench: $(STAMP)
	$(PY) benchmarks/forward.py

clean:
	rm -rf $(VENV)
