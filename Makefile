# Two commands do everything on a fresh clone:
#   make run    set up, then run params/default.yaml through notebooks 01-04 into papermill_runs/
#   make test   set up, then run the test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
PARAMS ?= params/default.yaml
PYTEST_ARGS ?=

.PHONY: setup run test chromium lab clean-venv gpu-prep

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(VENV)/bin/salt kernel
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

run: setup
	$(VENV)/bin/salt run $(PARAMS)

# Headless Chromium for the report test (Debian package; best effort where apt is not usable).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not installed: the report browser test will be skipped"

test: setup chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

# What tools/gpu_cv.py needs on a GPU machine that has JAX but no TensorFlow (both git-ignored, carried
# there): the packed training set, and the venv's Keras with the two packages that machine lacks, for
# its Python 3.12. Commands for the GPU machine: README, "A GPU machine without TensorFlow".
gpu-prep: setup
	$(PY) tools/gpu_cv.py pack --out .devdata/train.npz
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$($(PY) -c "from importlib.metadata import version as v; print(*(f'{p}=={v(p)}' for p in ('keras', 'namex', 'optree')))")
	@ls -l .devdata .whl

clean-venv:
	rm -rf $(VENV)
