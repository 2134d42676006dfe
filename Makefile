# tfseg: every target runs the public commands a user would type.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

# Where the demo puts things (override on the command line, e.g. in tests/test_demo.py). The demo trains
# configs/cpu.yaml for DEMO_BUDGET minutes instead of its 15 (DEMO_BUDGET= keeps the config's own).
DEMO_DATA ?= data/synth
DEMO_RECORDS ?= records/synth
DEMO_CONFIG ?= configs/cpu.yaml
DEMO_RUN ?= runs/demo
DEMO_MODEL ?= saved_models/demo/1
DEMO_BUDGET ?= 5
SYNTH_OPTS ?=
# make test runs the test files on this many processes (pytest-xdist; a file's tests stay together, so
# each module-scoped fixture is built once; files with slow tests first: tests/conftest.py).
# TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: demo test test-fast lint

# (Re)create the virtual environment when it is missing or requirements.txt changed.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	cp requirements.txt $@

# The whole pipeline on the built-in synthetic data. Rerunning reuses the finished steps
# (dataset, records and training are no-ops when complete).
demo: $(STAMP)
	$(PY) -m tfseg.synth --out $(DEMO_DATA) $(SYNTH_OPTS) --preview $(DEMO_DATA)/preview.png
	$(PY) -m tfseg.make_records --data-dir $(DEMO_DATA) --out $(DEMO_RECORDS)
	$(PY) -m tfseg.train --config $(DEMO_CONFIG) --records $(DEMO_RECORDS) --run-dir $(DEMO_RUN) \
		$(if $(DEMO_BUDGET),--budget-minutes $(DEMO_BUDGET))
	$(PY) -m tfseg.evaluate --run $(DEMO_RUN)
	$(PY) -m tfseg.export --run $(DEMO_RUN) --out $(DEMO_MODEL) --overwrite
	$(PY) -m tfseg.predict --model $(DEMO_MODEL) --data-dir $(DEMO_DATA) --folds 0 \
		--out $(DEMO_RUN)/submission.csv --overlays $(DEMO_RUN)/overlays
	$(PY) -m tfseg.score --submission $(DEMO_RUN)/submission.csv --labels $(DEMO_DATA)/train.csv \
		--data-dir $(DEMO_DATA) --only-submitted-volumes --json $(DEMO_RUN)/submission_score.json
	$(PY) -m tfseg.summary --run $(DEMO_RUN) --model $(DEMO_MODEL) \
		--submission $(DEMO_RUN)/submission.csv --overlays $(DEMO_RUN)/overlays

test: $(STAMP)
	$(VENV)/bin/ruff check tfseg tests
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check tfseg tests
