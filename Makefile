# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: help run test test-quick check lint types schemas format clean bench-kafka bench-smtp bench-http bench-edges bench-http-ab bench-http-floor bench-blobs bench-router bench-open-load bench-e2e bench-hostile-smtp bench-hostile-http bench-smtp-auth bench-journal bench-archive bench-queue bench-sink bench-smtp-memory bench-parse-spare bench-http-rounds bench-stalls bench-broker-latency bench-edge-start bench-producer-batches bench-cpu-split

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The distribution was called "switchboard" until 2026-12-01: a checkout's older
# .venv still holds it under that name, and the checkout its switchboard.egg-info
# (found on the path from the repository's directory); their entry points beside
# the new ones made every adapter "registered twice". So both go first.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip uninstall --quiet --yes switchboard 2>/dev/null || true
	rm -rf switchboard.egg-info
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip uninstall --quiet --yes switchboard 2>/dev/null || true
	rm -rf switchboard.egg-info
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

## Each target with the first line of the comment above it.
help:
	@awk '/^## /{if (!c) c=substr($$0, 4); next} /^[a-z][a-z-]*:/{if (c) printf "  %-20s %s\n", substr($$1, 1, length($$1)-1), c} {c=""}' $(MAKEFILE_LIST)

## Start the pipeline: embedded in-memory broker and SQLite unless configured otherwise.
run: $(VENV)/.installed
	$(BIN)/switchboard run

## Lint, types, schema drift, then the whole test suite in two runs side by side:
## three workers for everything but the fault suite (the tests mostly wait on brokers,
## servers and group joins: three workers kept the two cores 123-126% busy of 200; an
## idle worker takes tests queued for another, so the slow scenarios do not pile up on
## one), and the fault suite in one process beside them (its scenarios time outages
## one after another; the database fault restarts a PostgreSQL of its own, never the
## shared one). The fault suite's report is printed once the main suite is done.
test: check
	@log=$$(mktemp); \
	$(BIN)/pytest -m faults $(PYTEST_ARGS) >"$$log" 2>&1 & faults=$$!; \
	$(BIN)/pytest -n 3 --dist worksteal -m "not faults" $(PYTEST_ARGS); main=$$?; \
	wait $$faults; rc=$$?; \
	echo "---- the fault suite (ran beside the tests above), exit $$rc ----"; \
	cat "$$log"; rm -f "$$log"; \
	test $$main -eq 0 && test $$rc -eq 0

## The edit-test loop: the same checks, then everything but the fault suite and the
## scenarios marked `slow` (the longest end-to-end and concurrency runs), three workers.
## `make test` stays the whole suite; CI runs that.
test-quick: check
	$(BIN)/pytest -n 3 --dist worksteal -m "not faults and not slow" $(PYTEST_ARGS)

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

## Sender authentication (SPF, DKIM, DMARC) per SMTP message, DNS cache warm, vs verify off.
bench-smtp-auth: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/smtp_auth.py

## What the SMTP data budget costs in memory: concurrent 8 MiB messages against a 64 MiB budget.
bench-smtp-memory: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/smtp_memory.py

## How long small mail waits behind a long parse, with and without the spare parse process.
bench-parse-spare: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/parse_spare.py

## Legitimate mail latency while one client floods NOOPs and another holds its session limit.
bench-hostile-smtp: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/hostile_smtp.py

## HTTP ingest (Twilio, JSON hook) vs a bare FastAPI hook; needs wrk.
bench-http: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/http_ingest.py

## The edges alone, one and two processes per port (`ingest http|smtp --workers N`),
## each beside its bare ceiling in the same run.
bench-edges: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/http_ingest.py --concurrency 64 --workers 1,2 --skip-mailgun --fresh 60000
	PYTHONPATH=. $(BIN)/python bench/smtp_ingest.py --workers 1,2

## The HTTP edges' ratio to the bare hook in five rounds in turn, each against its own
## bare hook, and the medians (one run's bare hook drifts by a third here).
bench-http-rounds: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/http_ingest.py --concurrency 64 --workers 2 --skip-mailgun --fresh 60000 --rounds 5

## Where the two cores go per HTTP hook request: edge threads, broker, wrk (from /proc).
bench-cpu-split: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/cpu_split.py --workers 2

## Where an HTTP edge's latency spikes come from: its threads sampled while saturated.
bench-stalls: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/stalls.py

## The embedded broker's acknowledgement times, alone and beside busy processes:
## e.g. make bench-broker-latency ARGS='--hogs 2 --producer-session own'
bench-broker-latency: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/broker_latency.py $(ARGS)

## What a produce request costs kafka-python's network thread, by records a request.
bench-producer-batches: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/producer_batches.py $(ARGS)

## An edge fleet's start: time to the first /readyz 200, each process's memory (ARGS=--role smtp).
bench-edge-start: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/edge_start.py $(ARGS)

## Two edge settings (or checkouts) side by side, loaded in alternation: e.g.
## make bench-http-ab AB='--a SWITCHBOARD_KAFKA_EDGE_LINGER_MS=5 --b SWITCHBOARD_KAFKA_EDGE_LINGER_MS=1'
bench-http-ab: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/http_ab.py $(AB)

## The floor of a durable Twilio hook in Python here (no framework): run beside bench-edges.
bench-http-floor: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/http_floor.py --workers 1,2

## A small blob stored durably: a file each against packs (the data directory's disk).
bench-blobs: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/blob_layouts.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis var *.egg-info

## Router throughput vs raw consume, on SQLite and PostgreSQL (needs PostgreSQL at 127.0.0.1).
bench-router: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/routing.py

## A least-loaded team's open-conversation count as the tables grow.
bench-open-load: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/open_load.py

## End to end, accepted to visible in the queue, on SQLite and PostgreSQL; a 10 s broker outage.
bench-e2e: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/e2e.py

## Server RSS under 8 parallel 100 MB unauthenticated posts (API, page login, form hook).
bench-hostile-http: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/hostile_http.py

## The journal's cost on SMTP and HTTP ingest (with and without), and recovery after a SIGKILL.
bench-journal: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/journal.py

## The archive sink vs raw consume on the same 100,000 events, and the archive's size.
bench-archive: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/archive.py

## The queue sink's store alone: routed and contact events into the read model, SQLite and PostgreSQL.
bench-sink: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/queue_sink.py

## Queue listing (10,000 open customers) and search (100,000 messages) latency on PostgreSQL.
bench-queue: $(VENV)/.installed-dev
	PYTHONPATH=. $(BIN)/python bench/queue_latency.py
