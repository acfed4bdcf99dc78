# Quick start: `make demo` (restore the bundled sample collection) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,dask]"
	rm -f $(VENV)/.installed-*; touch $@

test: setup
	$(PY) -m ruff check gdp flows tests bench deployments
	$(PY) -m pytest -q

demo: setup
	$(PY) -m flows demo

clean:
	rm -rf $(VENV) .pytest_cache out
