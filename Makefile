# One command sets up the environment (if missing) and runs the demo; one runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# Both wheels lie on this machine's disk (a CUDA build that runs on the CPU too); torchvision is
# needed by pytorch-fid, the reference the Inception test compares against. Any other torch spec
# downloads a multi-GB build.
TORCH := torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

CACHE ?= .cache
FMNIST_PRESETS := fmnist-main fmnist-main-drop fmnist-guide fmnist-uncond

.PHONY: setup data demo test test-fast train evaluator study clean

setup: $(VENV)/.installed data

# dinov2: the torch-hub DINOv2 code, reference of the hub-layout converter test (--no-deps: its own
# requirements pin another torch).
$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) -e '.[test,convert]'
	$(PY) -m pip install -q --no-deps dinov2
	touch $@

# Fashion-MNIST (training and the guidance study) from Debian's dataset-fashion-mnist package.
data: $(FMNIST)/train-images-idx3-ubyte.gz

$(FMNIST)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get install -y -q dataset-fashion-mnist || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

demo: setup
	$(PY) -m experiments.toy2d

test: setup
	$(PY) -m pytest -q --durations=15 tests

# The fast loop: without the subprocess and end-to-end tests (marked slow; CI runs everything).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

# The four Fashion-MNIST networks of the guidance study; a run with a done.json is skipped, an
# interrupted one resumes.
train: setup $(FMNIST_PRESETS:%=$(CACHE)/fmnist/%/done.json)

$(CACHE)/fmnist/%/done.json:
	$(PY) -m experiments.train --preset=$* --run_dir=$(CACHE)/fmnist/$*

# The Fashion-MNIST classifier, reference statistics and sanity rows (skipped once evaluator.json exists).
evaluator: setup $(CACHE)/fmnist/evaluator/evaluator.json

$(CACHE)/fmnist/evaluator/evaluator.json:
	$(PY) -m experiments.fmnist_evaluator --cache=$(CACHE)/fmnist/evaluator

# The guidance study (hours on a CPU: see README; STUDY_FLAGS=--dry_run prints its size).
study: train evaluator
	$(PY) -m experiments.study --cache=$(CACHE) --std=0.100 --evaluator_cache=$(CACHE)/fmnist/evaluator \
	    --out=$(CACHE)/study $(STUDY_FLAGS)

clean:
	rm -rf $(VENV) toy2d_out
