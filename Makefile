# Two commands do everything on a fresh machine:
#   make demo   -> installs into .venv, writes the synthetic dataset, runs the demo search
#   make test   -> installs into .venv, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ANOSEG := $(VENV)/bin/anoseg
STAMP := $(VENV)/.install-stamp
DATA ?= results/data/synthetic

.PHONY: install browser postgres demo demo-data evaluate-demo test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo-data: $(STAMP)
	@if [ -d "$(DATA)" ]; then echo "dataset already at $(DATA)"; else $(ANOSEG) data synth $(DATA); fi

ifndef RUN
RUN := quick-$(shell date +%Y%m%d-%H%M%S)
endif

demo: demo-data
	$(ANOSEG) search run spaces/quick.yaml --data $(DATA) --name $(RUN)
	$(ANOSEG) dashboard results/$(RUN)
	$(ANOSEG) export results/$(RUN) --out results/$(RUN)/best.yaml

evaluate-demo: demo-data
	$(ANOSEG) evaluate --config configs/patchcore_lite0.yaml --data $(DATA) --json results/demo/patchcore_lite0.json

# The dashboard's browser test drives Debian's chromium (never a browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The storage tests start a throw-away PostgreSQL server from Debian's postgresql package (binaries under
# /usr/lib/postgresql/<version>/bin; nothing is started here). Without it they are skipped, with the reason.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "make postgres: could not install Debian's postgresql package; the PostgreSQL tests will be skipped"

test: $(STAMP) browser postgres
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) results/data results/demo results/quick-*
