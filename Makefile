# `make demo` sets up the package alone (JAX, Flax, Optax, Orbax: no torch) and runs the 2-D toy;
# `make test` adds torch and the reference libraries the tests compare against.
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch pair the reference tests use (torchvision for pytorch-fid's Inception). This pinned pair
# installs from a local wheel cache on the project's CI machine; elsewhere pip downloads it.
TORCH := torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

CACHE ?= $(HOME)/.cache/edm2-jax
FMNIST_PRESETS := fmnist-main fmnist-main-drop fmnist-guide fmnist-uncond
# Second training seeds (the study's extra main models): `train` trains fmnist-main's, `train-seeds` also
# fmnist-main-drop's.
SEED_RUNS := fmnist-main-seed1
EXTRA_SEED_RUNS := fmnist-main-drop-seed1

.PHONY: setup setup-test data demo tutorial test test-fast train train-seeds evaluator study-plan study study-answer clean

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test data

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# dinov2: the torch-hub DINOv2 code, reference of the hub-layout converter test (--no-deps: its own
# requirements pin another torch).
$(VENV)/.installed-test: $(VENV)/.installed
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

# A tiny random network → images with three guidance methods → a grid and a score (examples/tutorial.py).
tutorial: setup
	$(PY) examples/tutorial.py --out=tutorial_out

# -n auto: one pytest worker per core (pytest-xdist); loadfile: a module's tests (and fixtures) on one worker.
test: setup-test
	$(PY) -m pytest -q -n auto --dist loadfile --durations=15 tests

# The fast loop: everything but the subprocess and end-to-end tests.
test-fast: setup-test
	$(PY) -m pytest -q -m "not slow" tests

# The four Fashion-MNIST networks of the guidance study and fmnist-main's second seed; a run with a
# done.json is skipped, an interrupted one resumes.
train: setup data $(FMNIST_PRESETS:%=$(CACHE)/fmnist/%/done.json) $(SEED_RUNS:%=$(CACHE)/fmnist/%/done.json)

train-seeds: train $(EXTRA_SEED_RUNS:%=$(CACHE)/fmnist/%/done.json)

$(CACHE)/fmnist/%/done.json:
	$(PY) -m experiments.train --preset=$* --run_dir=$(CACHE)/fmnist/$*

# <preset>-seed1: the preset trained with seed 1 (this rule's stem is the shorter, so it wins).
$(CACHE)/fmnist/%-seed1/done.json:
	$(PY) -m experiments.train --preset=$* --seed=1 --run_dir=$(CACHE)/fmnist/$*-seed1

# The Fashion-MNIST classifier, reference statistics and sanity rows (skipped once evaluator.json exists).
evaluator: setup data $(CACHE)/fmnist/evaluator/evaluator.json

$(CACHE)/fmnist/evaluator/evaluator.json:
	$(PY) -m experiments.fmnist_evaluator --cache=$(CACHE)/fmnist/evaluator

# The guidance study (hours on a CPU: docs/fmnist-study.md); `make study-plan` prints its size first,
# with no network trained. The study picks up the seed runs that exist (train-seeds: one more).
STUDY = $(PY) -m experiments.study --cache=$(CACHE) --std=0.100 --evaluator_cache=$(CACHE)/fmnist/evaluator \
    --out=$(CACHE)/study

# The run behind README's answer (docs/fmnist/study/, then docs/fmnist/study-seeds/: seed 1 at the settings
# tuned on fmnist-main, whose results it reuses); about 3 h on 2 CPU cores.
ANSWER_METHODS := none,cfg-interval,autoguidance,insitu,insitu-schedule,insitu-frozen,insitu-avg2,history,pag
ANSWER_FLAGS := --num_steps=16 --tune_n=250 --report_n=2000 --report_sets=3 --pr_refs=2000 --batch=250
MAIN_NET = $(CACHE)/fmnist/$(1)/network-0.100

study-answer: train evaluator
	$(STUDY) --main=fmnist-main:$(call MAIN_NET,fmnist-main) --methods=$(ANSWER_METHODS) $(ANSWER_FLAGS)
	mkdir -p $(CACHE)/study-seeds/runs && ln -sfn $(CACHE)/study/runs/fmnist-main $(CACHE)/study-seeds/runs/
	$(STUDY) --out=$(CACHE)/study-seeds --tuned_on=fmnist-main \
	    --main=fmnist-main:$(call MAIN_NET,fmnist-main),fmnist-main-seed1:$(call MAIN_NET,fmnist-main-seed1) \
	    --methods=none,autoguidance,insitu,insitu-frozen,history $(ANSWER_FLAGS)

study-plan: setup
	$(STUDY) --dry_run $(STUDY_FLAGS)

study: train evaluator
	$(STUDY) $(STUDY_FLAGS)

clean:
	rm -rf $(VENV) toy2d_out tutorial_out
