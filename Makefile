# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-quick lint format bench clean

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deepssm demo --out demo-output

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow $(PY) -m pytest -q Testing

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" Testing

bench: $(STAMP)
	$(PY) benchmarks/bench_augment.py
	$(PY) benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
