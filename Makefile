# `make test` sets up everything the tests need on a fresh Debian/Ubuntu machine
# (a virtualenv with jobrunner and its test extra, the PostgreSQL server binaries,
# PgBouncer, headless Chromium and chromedriver),
# then runs the suite against a throwaway cluster it starts itself.
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: run test venv postgres pgbouncer chromium clean

# The service on :9090; with DATABASE_URL unset, a private PostgreSQL in .jobrunner/
# and an example downstream that calls back `succeeded`.
run: venv postgres
	$(VENV)/bin/jobrunner run

test: venv postgres pgbouncer chromium
	$(VENV)/bin/pytest $(PYTEST_ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

postgres:
	scripts/ensure-postgres

# Debian's PgBouncer, for the tests that run jobrunner through it (tests/test_pgbouncer.py);
# without it they are skipped, except in CI (CI set), where they must run
pgbouncer:
	scripts/ensure-pgbouncer || [ -z "$$CI" ]

# headless Chromium and chromedriver, for the dashboard's browser test; without them
# the test is skipped, except in CI (CI set), where it must run
chromium:
	scripts/ensure-chromium || [ -z "$$CI" ]

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
