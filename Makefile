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

.PHONY: env demo lab test sync nbtest pytest bench export clean

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

# The whole suite: notebooks in sync with modelfusion/, in-notebook tests, pytest (incl. papermill smoke runs).
test: env sync nbtest pytest

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

clean:
	rm -rf runs _docs _proc .pytest_cache
