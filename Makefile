# modelfusion: `make demo` and `make test` work from a fresh clone; they create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# Full data sets: $MODELFUSION_DATA when set (even to empty, which forces the embedded MNIST sample),
# else ../shared/data when it holds MNIST.
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(origin MODELFUSION_DATA),undefined)
  ifneq ($(wildcard $(SHARED_DATA)/mnist),)
    export MODELFUSION_DATA := $(SHARED_DATA)
  endif
endif

.PHONY: env demo lab test sync nbtest pytest bench export clean docs test-docs readme

env: $(VENV)/.installed

$(VENV)/.installed: constraints.txt settings.ini setup.py pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name modelfusion --display-name "Python (modelfusion)" >/dev/null
	@touch $@

demo: env
	$(BIN)/modelfusion demo $(DEMO_ARGS)

# JupyterLab from the venv, in nbs/, with the `modelfusion` kernel and ipywidgets (the λ slider) available.
# Options: make lab LAB_ARGS="--no-browser --port=8899". As root, --allow-root is added (Jupyter refuses root otherwise).
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
lab: env
	cd nbs && exec $(abspath $(BIN))/jupyter lab $(LAB_ROOT) $(LAB_ARGS)

# The whole suite: notebooks in sync with modelfusion/, in-notebook tests, the docs site, pytest (incl. papermill smoke
# runs and tests/test_docs.py, which loads the site just built in headless Chromium).
test: env sync nbtest docs pytest

sync: env
	@before=$$(git status --porcelain -- nbs modelfusion); \
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean; \
	after=$$(git status --porcelain -- nbs modelfusion); \
	if [ "$$before" != "$$after" ]; then \
	  echo "FAIL: nbdev_export/nbdev_clean changed files: notebooks and modelfusion/ are out of sync or notebooks are not clean:"; \
	  diff <(echo "$$before") <(echo "$$after"); git --no-pager diff --stat -- nbs modelfusion; exit 1; \
	else echo "sync: modelfusion/ equals a fresh export; notebooks are clean"; fi

nbtest: env
	MODELFUSION_PROGRESS=0 $(BIN)/nbdev_test --n_workers 2

pytest: env
	MODELFUSION_PROGRESS=0 $(BIN)/pytest tests -ra

bench: env
	$(BIN)/python bench/bench_foundation.py

export: env
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

# The documentation site in _docs/, without Quarto: nbdev's notebook processors (every cell run, as nbdev_test runs
# them, within DOCS_BUDGET seconds; then API entries only) and smalldocs reading _quarto.yml; see tools/build_docs.py.
# `make docs DOCS_BUDGET=0` runs every notebook however long it takes. Serve it: python -m http.server -d _docs
docs: env
	$(BIN)/python tools/build_docs.py build $(if $(DOCS_BUDGET),--budget $(DOCS_BUDGET))

# The site in a browser (Debian's chromium via Playwright) and the build's bad-input tests; screenshots: _docs_artifacts/
test-docs: docs
	MODELFUSION_PROGRESS=0 $(BIN)/pytest tests/test_docs.py -ra

# README.md from nbs/index.ipynb, its source (tests/test_docs.py fails when they differ)
readme: env
	$(BIN)/python tools/build_docs.py readme

clean:
	rm -rf runs _docs _docs.building-* _docs_artifacts _proc .pytest_cache .cache/docs
