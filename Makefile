# `make test` and `make demo` work on a fresh clone: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BACKENDS := jax tensorflow torch

.PHONY: install demo notebooks test test-fast lint test-jax test-tensorflow test-torch clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[all,dev]"
	touch $@

# Built-in data -> DeCLIP training on the CPU -> evaluation -> SavedModel export,
# about 4 minutes on 2 cores after the install. KERAS_BACKEND picks the backend;
# torch is the default here because it trains fastest on CPU.
demo: install
	KERAS_BACKEND=$${KERAS_BACKEND:-torch} $(PY) scripts/demo.py --output demo

# Runs every tutorial notebook top to bottom on the CPU and saves its outputs in
# place (their scratch files go to notebooks/work/); fails if any cell fails.
notebooks: install
	KERAS_BACKEND=$${KERAS_BACKEND:-torch} $(PY) scripts/run_notebooks.py notebooks/*.ipynb

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The whole suite once per backend; each backend is a separate process because
# Keras fixes its backend at import time, and the passes run side by side.
test: lint
	$(PY) scripts/run_test_passes.py --backends $(BACKENDS)

# The day-to-day loop: one backend (torch, the quickest to build and step
# models on a CPU) with the backend-independent tests, without the slow
# end-to-end runs.
test-fast: install
	DECLIP_KERAS_INDEPENDENT_TESTS_BACKEND=torch KERAS_BACKEND=torch \
		$(PY) -m pytest -q -m "not slow"

# One backend's pass of `make test`, e.g. `make test-jax`.
test-%: install
	KERAS_BACKEND=$* $(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info demo notebooks/work
