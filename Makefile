# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test check lint types schemas format clean bench-kafka bench-smtp bench-http bench-router bench-e2e

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

## Start the pipeline: embedded in-memory broker and SQLite unless configured otherwise.
run: $(VENV)/.installed
	$(BIN)/switchboard run

## Lint, types, schema drift, then the whole test suite.
test: check
	$(BIN)/pytest $(PYTEST_ARGS)

check: lint types schemas

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(VENV)/.installed-dev
	$(BIN)/mypy
	# The example adapter's own tests, as that package's CI would check them.
	cd tests/example_adapter && MYPYPATH=. ../../$(BIN)/mypy --strict tests

schemas: $(VENV)/.installed-dev
	$(BIN)/switchboard schema export --check

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Kafka ceilings on this machine (raw kafka-python vs our publisher).
bench-kafka: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/kafka_throughput.py

## SMTP ingest vs a bare aiosmtpd handler (starts its own servers).
bench-smtp: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/smtp_ingest.py

## HTTP ingest (Twilio, JSON hook) vs a bare FastAPI hook; needs wrk.
bench-http: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/http_ingest.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var

## Router throughput vs raw consume, on SQLite and PostgreSQL (needs PostgreSQL at 127.0.0.1).
bench-router: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/routing.py

## End to end, accepted to visible in the queue, on SQLite and PostgreSQL; a 10 s broker outage.
bench-e2e: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/e2e.py
