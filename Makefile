# `make repro` runs the pipeline, `make test` the tests; both set up .venv first (once).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup repro test bench clean-venv

# Reinstall only when the dependency list changes; a no-op (instant) otherwise.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# dvc runs each stage's `python -m stages ...` with the venv first on PATH.
repro: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: setup
	$(PY) -m benchmarks.circles --clip-model toy-clip --clip-pretrained local-dir:models/toy/clip --radius 10 --width 1 --autocast

clean-venv:
	rm -rf $(VENV)
