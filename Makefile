# One venv, torch pinned first so pip never resolves `torch` to a multi-GB CUDA build.
# Users with CUDA: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make demo
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test lint bench example-store clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	# torch pinned again on the same line so resolving the extras (lightning, transformers) can never replace it.
	$(PY) -m pip install -q $(TORCH_SPEC) -e ".[test,lightning,transformers]"
	touch $@

demo: install
	$(VENV)/bin/mlflow-best demo

lint: install
	$(VENV)/bin/ruff check mlflow_best tests benchmarks scripts
	$(VENV)/bin/mypy

test: install lint
	$(PY) -m pytest --cov=mlflow_best --cov-report=term-missing:skip-covered $(PYTEST_ARGS)

bench: install
	$(PY) -m pip install -q -r benchmarks/requirements.txt
	$(PY) benchmarks/bench.py

example-store: install
	$(PY) scripts/make_example_store.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
