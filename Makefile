# The commands the README gives. `make demo` runs the portal; `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
TEST_DATABASE_URL ?= postgres://portal:portal@127.0.0.1:5432/portal
TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: demo test lint check

demo:
	bash lab/bootstrap.sh venv redis
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py seed_demo
	$(PY) manage.py rundemo

test:
	bash lab/bootstrap.sh venv-dev redis postgres chromium
	$(MAKE) --no-print-directory check
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(VENV)/bin/pytest

check:
	$(VENV)/bin/ruff check .
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run -v0

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
