# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint install system-deps bench-ingest bench-e2e bench-rationale bench-web bench-delivery bench-faults clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

## Debian's dcmtk, dicom3tools and orthanc (the tests' real peers); needs root.
system-deps:
	./scripts/install-system-deps.sh

## The main job on the embedded default: SQLite, server-less broker, no servers to install.
demo: $(STAMP)
	$(BIN)/gvr demo

test: $(STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Style and types: ruff and strict mypy on every package.
lint: $(STAMP)
	$(BIN)/python -m pip install -q 'ruff>=0.6' 'mypy>=1.10'
	$(BIN)/ruff check .
	$(BIN)/mypy --strict node inference training

## Ingest benchmark: the node (SQLite and PostgreSQL audit DB), Orthanc and dcmtk storescp from storescu,
## 1 and 8 associations; the table into docs/bench-ingest.md.
bench-ingest: $(STAMP) system-deps
	$(BIN)/python -m benchmarks.ingest --markdown docs/bench-ingest.md

## Rationale benchmark: GVR vs Latent Shift, captum and image-independent templates on held-out
## phantoms with twins, the lambda sweep, speed and the digits; tables and figures into docs/rationale.md.
## `make bench-rationale SEEDS=900000-900199 BUNDLE=path/to/bundle`
SEEDS ?= 900000-900199
BUNDLE ?=
bench-rationale: $(STAMP)
	$(BIN)/python -m benchmarks.rationale all --threads 1 --seeds $(SEEDS) $(if $(BUNDLE),--bundle $(BUNDLE)) \
		--docs docs/rationale.md

## Turnaround from the last C-STORE to the SR in Orthanc, single and 20 studies, one CPU worker,
## beside an Orthanc routing node forwarding the same studies (--no-peer skips it).
bench-e2e: $(STAMP) system-deps
	$(BIN)/python -m benchmarks.e2e

## Delivery CPU per study (build the SCs and SR, C-STORE them) beside dcmtk storescu sending the same files.
bench-delivery: $(STAMP) system-deps
	$(BIN)/python -m benchmarks.delivery

## Review page (gvr web): server time per page with 10,000 jobs in a private SQLite audit DB.
bench-web: $(STAMP)
	$(BIN)/python -m benchmarks.web

## Fault scenarios of issue 10 with default settings: PostgreSQL down 20 s with a backlog, Redis SIGKILLed
## mid-pipeline, the delivery worker SIGKILLed mid-association; recovery seconds in the summary (docs/reliability.md).
bench-faults: $(STAMP) system-deps
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/reliability/bench_faults.py tests/reliability/test_redis_killed.py \
		tests/reliability/test_delivery_killed.py

clean:
	rm -rf $(VENV) gvr-data .pytest_cache
