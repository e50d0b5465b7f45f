# One command sets up the environment (if missing) and runs the demo; one runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU wheel; any other torch spec pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) -e '.[test,convert]'
	touch $@

demo: setup
	$(PY) -m experiments.toy2d

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) toy2d_out
