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

.PHONY: setup run test chromium lab clean-venv

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

clean-venv:
	rm -rf $(VENV)
