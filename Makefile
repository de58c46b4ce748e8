# kmskeys: `make demo` shows the product working, `make test` proves it. Both start from a bare
# Debian machine: they install the packages and the .venv they need.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

# Debian packages every tier needs; topic makefiles in mk/ append to these lists.
# libssl-dev: the static libcrypto the `kmskeys unprotect` program links (setup.py PROGRAMS).
APT_PACKAGES := keyutils libkeyutils-dev libssl-dev gcc libc6-dev iproute2 procps iptables nftables \
                lighttpd wrk util-linux
TEST_PREREQS :=
PYTEST_ARGS  ?=

.PHONY: all deps venv compile generate test lint typecheck pytest demo bench soak flake-check clean

all: test

include $(wildcard mk/*.mk)

deps:
	@scripts/ensure-apt.sh $(APT_PACKAGES)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py kmskeys/_build_keyutils.py kmskeys/_hitpath.c kmskeys/_hitpath_keys.h kmskeys/_names.h resolver/gate.c resolver/gate_daemon.c resolver/gate_request.c resolver/gate_subuid.c resolver/gate.h kmskeys/contract.h $(wildcard bin/*) | deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# Bytecode is compiled up front: with PYTHONDONTWRITEBYTECODE set, every import would otherwise
# recompile the source, and the client's import-time budget is a few milliseconds.
compile: venv
	@$(PY) -m compileall -q kmskeys encryptor resolver

# What is generated from its one source (scripts/generate.py): kmskeys/contract.h and the
# build stamp, and the config table of docs/resolver.md. A unit test fails when they are stale;
# after this, `make venv` rebuilds the compiled parts with the new stamp.
generate: venv
	$(PY) scripts/generate.py

lint: venv
	$(VENV)/bin/ruff check kmskeys encryptor resolver tests examples scripts
	$(VENV)/bin/ruff format --check kmskeys encryptor resolver tests examples scripts
	$(VENV)/bin/lint-imports --no-logo --no-cache

typecheck: venv
	$(VENV)/bin/mypy

pytest: deps venv compile $(TEST_PREREQS)
	$(PYTEST) $(PYTEST_ARGS)

# The venvs build side by side first (on a cold pip cache each takes a minute or more), then
# the checks and the tiers run one after the other: the tiers' timing must not share the CPU.
test:
	@$(MAKE) --no-print-directory -j4 venv $(TEST_PREREQS)
	@$(MAKE) --no-print-directory lint typecheck pytest

demo: deps venv compile $(TEST_PREREQS)
	$(PY) scripts/demo.py

# The apps the benchmark starts (CGI scripts, fresh processes) and the resolver its misses run
# come from a regular install, as in production: an editable install adds its import finder to
# every interpreter start.
BENCH_VENV := .venv-bench

$(BENCH_VENV)/.installed: pyproject.toml setup.py $(wildcard bin/* kmskeys/*.py kmskeys/*.c kmskeys/*.h encryptor/*.py resolver/*.py resolver/*.c resolver/*/*.py) | deps
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q --force-reinstall --no-deps .
	$(BENCH_VENV)/bin/python -m pip install -q '.[resolver]'
	@# boto3 is no dependency of the resolver (botocore is): the CGI and fresh-process rows'
	@# per-process boto3 decrypt baseline needs it in the apps' venv, and the Secrets Manager
	@# rows AWS's own caching library (tests/bench/sources.py).
	$(BENCH_VENV)/bin/python -m pip install -q boto3 aws-secretsmanager-caching
	@touch $@

bench: deps venv compile $(TEST_PREREQS) $(BENCH_VENV)/.installed
	KMSKEYS_BENCH_PYTHON=$(BENCH_VENV)/bin/python $(PY) -m tests.bench

soak: deps venv compile $(TEST_PREREQS)
	KMSKEYS_SOAK=long $(PYTEST) -m soak $(PYTEST_ARGS)

# The timing-sensitive tiers (faults, kernel), FLAKE_RUNS times in a row; the first failing run
# stops it. A flake here is a test that relies on timing it cannot have (docs/reliability.md).
FLAKE_RUNS ?= 10

flake-check: deps venv compile
	@for run in $$(seq 1 $(FLAKE_RUNS)); do \
		echo "flake-check: run $$run/$(FLAKE_RUNS)"; \
		$(PYTEST) -q -p no:cacheprovider tests/faults tests/kernel $(PYTEST_ARGS) || exit 1; \
	done; echo "flake-check: $(FLAKE_RUNS)/$(FLAKE_RUNS) runs passed"

clean:
	rm -rf $(VENV) .venv-checkov $(BENCH_VENV) build dist *.egg-info kmskeys/_keyutils_cffi*.so .pytest_cache .mypy_cache .ruff_cache
