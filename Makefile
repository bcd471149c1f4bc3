# jobrunner developer commands. `make demo` and `make test` are the two you need.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STACK := deploy/local
STACK_ENV ?= /tmp/jobrunner-stack/stack.env
PYTEST_ARGS ?=
HELM_VERSION := $(shell sed -n 's/^HELM_VERSION="$${HELM_VERSION:-\(v[0-9.]*\)}"/\1/p' $(STACK)/build-helm.sh)
# A Python >= 3.11: python3 when it is new enough, else the newest python3.X on PATH.
PYTHON ?= $(shell for p in python3 python3.14 python3.13 python3.12 python3.11; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && { echo $$p; break; }; done)

# A virtualenv whose Python is gone or older than 3.11 (made before a newer one was
# installed, say) is made again, instead of every target failing the same way forever.
ifneq ($(shell $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo ok),ok)
$(shell rm -f $(BIN)/.installed)
endif

.PHONY: help venv lint test test-unit test-integration demo demo-cluster demo-functions bench bench-keda soak \
	stack-up stack-down stack-status clean

help:
	@echo "make demo              eleven messages through a dispatcher on this machine: no cluster,"
	@echo "                       no broker; makes the virtualenv first if needed (~10 s after that)"
	@echo "make demo-cluster      the same idea on the local stack (Kubernetes + RabbitMQ); starts it"
	@echo "make demo-functions    two Azure Functions-style apps, one Job per message: no cluster,"
	@echo "                       no Azure (~5 s after the virtualenv; the handler example needs Node)"
	@echo "make test              ruff, mypy, import contracts and every test; starts the local stack"
	@echo "make test-unit         the unit tests and the embedded-mode tests: no services; 1157 tests,"
	@echo "                       2 min of CPU (6 min on 2 cores shared with other work); builds"
	@echo "                       Helm first for the chart tests when Go is on PATH"
	@echo "make test-integration  the tests against the local stack alone; starts it"
	@echo "make lint              ruff, mypy --strict and the import contracts"
	@echo "make bench             dispatch benchmarks: RabbitMQ, Kafka, SQS, Redis, NATS, MQTT, HTTP (~36 min)"
	@echo "make bench-keda        jobrunner beside the real KEDA operator (built from source the first"
	@echo "                       time, ~10 min), one table (~15 min); starts the stack"
	@echo "make soak              10 min chaos run: dispatchers killed, brokers and API server"
	@echo "                       restarted, Jobs deleted; SOAK_ARGS='--seed 3 --minutes 30'"
	@echo "make helm              build Helm from the Go module proxy into the stack's cache (~1 min)"
	@echo "make crds              write deploy/crds/ and the chart's crds/ from the pydantic models"
	@echo "make stack-up          start the local stack (builds it the first time, ~17 min)"
	@echo "make stack-down        stop it (keeps its data; purge: bash $(STACK)/stack-down.sh --purge)"
	@echo "make stack-status      what runs, where, and its memory"
	@echo "make venv              the virtualenv $(VENV) with jobrunner installed (editable)"
	@echo "make clean             remove the virtualenv, caches, ./.jobrunner and this clone's demos'"
	@echo "                       state (\$${TMPDIR:-/tmp}/jobrunner-demo-<this clone>-*)"
	@echo "PYTHON=/path/to/python3.11 picks the interpreter for the virtualenv."

$(BIN)/.installed: pyproject.toml
	@if [ -z "$(PYTHON)" ]; then \
		echo "jobrunner needs Python >= 3.11 and found none on PATH (python3 is" \
			"$$(python3 --version 2>&1 || echo missing)); install one, or run make PYTHON=/path/to/python3.11"; \
		exit 1; fi
	@if [ -e $(VENV) ] && ! $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
			2>/dev/null; then \
		echo "$(VENV) was made by $$($(BIN)/python --version 2>&1 || echo 'a Python that is gone');" \
			"making it again with $$($(PYTHON) --version)"; \
		rm -rf $(VENV); fi
	@echo "Making the virtualenv $(VENV) with $$($(PYTHON) --version) and installing jobrunner into it"
	@echo "(editable) with kubernetes, aio-pika, aiokafka, pydantic, jinja2, opentelemetry, rich and"
	@echo "the test tools (pytest, mypy, ruff, import-linter): once, about a minute. Afterwards the"
	@echo "jobrunner command is $(BIN)/jobrunner (or: source $(BIN)/activate)."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

stack-up:
	bash $(STACK)/stack-up.sh

helm:
	bash $(STACK)/build-helm.sh

crds: venv
	$(BIN)/python deploy/crds/generate.py

stack-down:
	bash $(STACK)/stack-down.sh

stack-status:
	bash $(STACK)/stack-status.sh

lint: venv
	$(BIN)/ruff check jobrunner tests bench deploy/local deploy/crds
	$(BIN)/mypy
	$(BIN)/lint-imports

# The chart tests need only a Helm binary (no stack): found in the cache or on PATH, else
# built first when Go is there (`make helm`), else they are skipped saying how to get one.
test-unit: venv
	@if [ ! -x "$${JOBRUNNER_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/jobrunner}/helm-$(HELM_VERSION)/bin/helm" ] \
		&& ! command -v helm >/dev/null && command -v go >/dev/null; then \
		echo "Building Helm $(HELM_VERSION) for the chart tests (once; about a minute with Go's cache warm)"; \
		bash $(STACK)/build-helm.sh; fi
	$(BIN)/pytest -m "not integration" $(PYTEST_ARGS)

test-integration: venv stack-up helm
	set -a && source $(STACK_ENV) && set +a && $(BIN)/pytest -m integration $(PYTEST_ARGS)

test: venv stack-up helm lint
	set -a && source $(STACK_ENV) && set +a && $(BIN)/pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/python $(STACK)/demo.py

demo-functions: venv
	$(BIN)/python $(STACK)/demo_functions.py

demo-cluster: venv stack-up
	bash $(STACK)/stack-status.sh
	$(BIN)/python $(STACK)/demo.py --cluster

soak: venv stack-up
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

bench: venv stack-up
	$(BIN)/python bench/bench_dispatch.py rabbitmq
	$(BIN)/python bench/bench_dispatch.py kafka
	for s in sqs redis nats mqtt; do $(BIN)/python bench/bench_dispatch.py $$s || exit 1; done
	$(BIN)/python bench/bench_real_node.py
	$(BIN)/python bench/bench_http.py
	$(BIN)/python bench/bench_kueue.py

# KEDA is built (once, cached in ~/.cache/jobrunner/keda-<version>/) and started only here.
bench-keda: venv stack-up
	bash $(STACK)/build-keda.sh >/dev/null
	$(BIN)/python bench/bench_keda.py
	$(BIN)/python bench/bench_keda_real_node.py

# Only this clone's demo state: its demos name their directories after this clone's path
# (deploy/local/demo_common.py, clone_id), so another clone's are left alone.
clean:
	@clone=$$($(PYTHON) -c 'import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest()[:8])' "$(CURDIR)") && \
	echo "rm -rf \"$${TMPDIR:-/tmp}\"/jobrunner-demo-$$clone-*" && \
	rm -rf "$${TMPDIR:-/tmp}"/jobrunner-demo-$$clone-*
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .jobrunner
