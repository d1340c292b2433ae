# Two entry points for a new user: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# checkov (infra checks in tests/test_infra.py) gets its own venv: its dependencies clash with the SDK's.
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: setup demo test lint fmt plan clean chaos bench

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt package.json package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	npm ci --silent --no-audit --no-fund
	touch $(STAMP)

$(CHECKOV_STAMP): infra/requirements-checkov.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r infra/requirements-checkov.txt
	touch $(CHECKOV_STAMP)

demo: setup
	$(PY) -m rebalancer demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint $(CHECKOV_STAMP)
	$(PY) -m pytest

bench: setup
	$(PY) -m bench

# The chaos suite (docs/safety.md): SEED=N picks the run, SCENARIO=NAME replays one scenario.
chaos: setup
	$(PY) -m chaos $(if $(SEED),--seed $(SEED)) $(if $(SCENARIO),--scenario $(SCENARIO)) $(if $(SCENARIOS),--scenarios $(SCENARIOS))

fmt: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) node_modules .pytest_cache .ruff_cache .hypothesis
