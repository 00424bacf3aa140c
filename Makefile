# mail2blob: everything installs itself on a fresh Debian machine (as root), idempotently.
#   make demo   the main job on the local stack (no Azure account)
#   make test   lint + the whole test suite against the local stack

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := dovecot-imapd isync chromium
BENCH_MESSAGES ?= 10000

.PHONY: deps test lint format demo bench reliability infra-check devstack-up devstack-down clean

deps: .deps/apt .deps/npm $(VENV)/.installed

.deps/apt:
	@mkdir -p .deps
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { \
	  echo "installing $(APT_PACKAGES) (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; }
	@touch $@

.deps/npm: package.json package-lock.json
	@mkdir -p .deps
	@test -x node_modules/.bin/azurite || { echo "installing Azurite (npm)"; npm ci --no-audit --no-fund --loglevel=error >/dev/null; }
	@touch $@

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing Python packages into $(VENV)"
	@$(PY) -m pip install -q -r requirements-dev.txt
	@# The Python worker's own indexing, for tests/test_worker_indexing.py (declares Python >= 3.13
	@# but is pure Python; its flags cannot live in a requirements file).
	@$(PY) -m pip install -q --no-deps --ignore-requires-python azure-functions-runtime==1.3.0
	@touch $@

lint: $(VENV)/.installed
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

infra-check:
	@bash scripts/check-infra

test: deps lint infra-check
	@$(VENV)/bin/pytest -q

demo: deps
	@$(PY) -m scripts.demo

bench: deps
	@$(PY) -m bench.drain_bench --messages $(BENCH_MESSAGES)

reliability: deps
	@MAIL2BLOB_RELIABILITY_LAST_LINE=1 $(PY) -m pytest -q tests/reliability -p no:cacheprovider

devstack-up: deps
	@scripts/devstack up

devstack-down:
	@scripts/devstack down

clean:
	rm -rf .deps $(VENV) .venv-checkov node_modules .devstack
