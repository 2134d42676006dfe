# tfseg: every target runs the public commands a user would type.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: demo test test-fast lint clean-demo

# (Re)create the virtual environment when it is missing or requirements.txt changed.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	cp requirements.txt $@

demo: $(STAMP)
	$(PY) -m tfseg.synth --out data/synth
	$(PY) -m tfseg.synth --out data/synth --preview data/synth/preview.png

test: $(STAMP)
	$(VENV)/bin/ruff check tfseg tests
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check tfseg tests
