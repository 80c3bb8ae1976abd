# `make repro` runs the pipeline, `make test` the tests; both set up .venv first (once).
# `make readme` regenerates the results tables of README.md and docs/ from metrics/*.json (docs/generate.py).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup repro test readme bench bench-gpu clean-venv

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

# No stage writes the docs: an uncached stage output would turn off DVC's run-cache.
readme: setup
	$(PY) -m docs.generate

# CPU, a few minutes. The toy circles kernel at the precision the circles stage picks here (circles.autocast: auto):
# bf16 only where the CPU has it natively. The scale run (ResNet-50 / ViT-B-16 at 224 px, small N, a 3 x 3 grid) in
# fp32: on CPUs, PyTorch runs open_clip's attention under bf16 autocast ~3x slower than fp32 even with AMX (README).
bench: setup
	$(PY) -m benchmarks.circles --clip-model toy-clip --clip-pretrained local-dir:models/toy/clip --radius 10 --width 1
	$(PY) -m benchmarks.scale --device cpu --precision fp32 --images 8 --rows-per-shard 4 --features-batch 4 --clip-batch 4 \
		--circles-batch 2 --grid 3 --concepts 1024 --cbl-batch 4 --cbl-steps 4 --sae-batch 64 --bare-calls 1 \
		--stages features clip_images circles cbl sae_data

# One GPU, under 8 minutes: every heavy stage at ImageNet shapes (N = 6144 random 224 px images, ViT-B-16 CLIP with
# the paper's 7 x 7 grid, ResNet-50, 4096 concepts), bf16 where the GPU has it.
bench-gpu: setup
	$(PY) -m benchmarks.scale --device cuda --precision auto --images 6144 --rows-per-shard 256 --features-batch 256 \
		--clip-batch 256 --circles-batch 64 --chunk 1024 --concepts 4096 --cbl-batch 512 --cbl-steps 40 --fact-batch 128 \
		--regions-images 8 --regions-batch 8 --workers 4 --bare-calls 5

clean-venv:
	rm -rf $(VENV)
