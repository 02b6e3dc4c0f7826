# One venv; torch is installed first, from TORCH_SPEC, so that resolving the package never picks another
# torch. From PyPI on Linux, torch==2.13.0 is the CUDA build (~2.7 GB with its nvidia-* wheels).
# CPU only (~200 MB): TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" make demo
# A given CUDA:       TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make demo
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
	# torch pinned again (the version only: TORCH_SPEC's index may hold nothing else, and 2.13.0+cpu
	# satisfies ==2.13.0) so resolving the extras (lightning, transformers) can never replace it.
	$(PY) -m pip install -q $(firstword $(TORCH_SPEC)) -e ".[test,lightning,transformers]"
	touch $@

demo: install
	$(VENV)/bin/mlflow-best demo

lint: install
	$(VENV)/bin/ruff check mlflow_best tests benchmarks scripts examples
	$(VENV)/bin/mypy

test: install lint
	$(PY) -m pytest --cov=mlflow_best --cov-report=term-missing:skip-covered $(PYTEST_ARGS)

bench: install
	$(PY) -m pip install -q -r benchmarks/requirements.txt
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/bench_startup.py

example-store: install
	$(PY) scripts/make_example_store.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
