# The whole set-up on a fresh machine is `make test` or `make demo`: each creates .venv/ when it is
# missing, installs the pinned requirements into it, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp

.PHONY: test demo lint venv clean

$(STAMP): requirements.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m esvit_kernels
	TRITON_INTERPRET=1 $(PY) -m esvit_kernels.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info esvit_kernels/_C*.so .pytest_cache
