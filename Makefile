# Retrainer — the two set-up commands are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv demo test lint services services-stop services-status bench clean

help:
	@echo "make demo            the whole story on embedded defaults (creates .venv if needed)"
	@echo "make test            lint, start Kafka/PostgreSQL/MinIO, migrate, run pytest, stop what it started"
	@echo "make lint            ruff (lint + format), import-linter layer contracts, mypy (strict) on every package"
	@echo "make services        start the local services that are down and create missing Kafka topics (idempotent); make services-stop stops them"
	@echo "make bench           run the benchmarks in bench/"

# The virtualenv is rebuilt when the pins change. constraints.txt locks every transitive package.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
	  { echo "Python 3.11 is required (found $$($(PYTHON) --version 2>&1) at $(PYTHON)); set PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# ONNX Runtime custom operators (vectorized norms, ml/quantization/kernels.py). Optional: without a C
# compiler or ONNX Runtime's C API header the build says why, and ONNX Runtime's own kernels run.
ORTOPS := ml/quantization/native/libretrainer_ortops.so
$(ORTOPS): ml/quantization/native/ortops.c ml/quantization/native/build.sh
	@bash ml/quantization/native/build.sh $@ || echo "ortops: not built; ONNX Runtime's own normalization kernels will run"

venv: $(STAMP) $(ORTOPS)

demo: venv
	$(BIN)/retrainer demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy domain ml web storage flows consumers serving api retrainer migrations

test: lint
	bash infra/local/test.sh

services:
	bash infra/local/services.sh start

services-stop:
	bash infra/local/services.sh stop

services-status:
	bash infra/local/services.sh status

# bench/triggers.py needs the local broker: the services are started (and left running).
bench: venv services
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf .retrainer .pytest_cache .mypy_cache .ruff_cache *.egg-info
