# jobrunner developer commands. `make demo` and `make test` are the two you need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STACK := deploy/local
STACK_ENV ?= /tmp/jobrunner-stack/stack.env
PYTEST_ARGS ?=

.PHONY: help venv stack-up stack-down stack-status lint test test-unit test-integration demo demo-cluster bench bench-keda clean

help:
	@echo "make demo         eleven messages through a dispatcher, no cluster or broker needed"
	@echo "make demo-cluster the same on the local stack (Kubernetes + RabbitMQ)"
	@echo "make test         lint, type-check and run every test against the real stack"
	@echo "make test-unit    the fast unit tests alone (no services)"
	@echo "make stack-up | stack-down | stack-status"
	@echo "make bench        benchmarks (figures printed)"
	@echo "make bench-keda   jobrunner beside the real KEDA operator (built from source), one table"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

stack-up:
	bash $(STACK)/stack-up.sh

stack-down:
	bash $(STACK)/stack-down.sh

stack-status:
	bash $(STACK)/stack-status.sh

lint: venv
	$(BIN)/ruff check jobrunner tests bench deploy/local
	$(BIN)/mypy
	$(BIN)/lint-imports

test-unit: venv
	$(BIN)/pytest -m "not integration" $(PYTEST_ARGS)

test-integration: venv stack-up
	set -a && source $(STACK_ENV) && set +a && $(BIN)/pytest -m integration $(PYTEST_ARGS)

test: venv stack-up lint
	set -a && source $(STACK_ENV) && set +a && $(BIN)/pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/python $(STACK)/demo.py

demo-cluster: venv stack-up
	bash $(STACK)/stack-status.sh
	$(BIN)/python $(STACK)/demo.py --cluster

bench: venv stack-up
	$(BIN)/python bench/bench_dispatch.py rabbitmq
	$(BIN)/python bench/bench_dispatch.py kafka

# KEDA is built (once, cached in ~/.cache/jobrunner/keda-<version>/) and started only here.
bench-keda: venv stack-up
	bash $(STACK)/build-keda.sh >/dev/null
	$(BIN)/python bench/bench_keda.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
