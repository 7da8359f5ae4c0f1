# The commands the README gives. `make demo` runs the portal; `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
TEST_DATABASE_URL ?= postgres://portal:portal@127.0.0.1:5432/portal
TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: demo test lint check lab-vcsim lab-vcsim-stop bench-vcsim

demo:
	bash lab/bootstrap.sh venv redis
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py seed_demo
	$(PY) manage.py rundemo

test:
	bash lab/bootstrap.sh venv-dev redis postgres chromium
	bash lab/vcsim/vcsim.sh build
	$(MAKE) --no-print-directory check
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) $(VENV)/bin/pytest

check:
	$(VENV)/bin/ruff check .
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run -v0

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# A vcsim (vCenter API simulator) for the demo: add it in the admin as a vCenter connection.
lab-vcsim:
	bash lab/vcsim/vcsim.sh start -dc 1 -cluster 2 -host 3 -standalone 0 -vm 4 -ds 3
	@echo "CA bundle (paste into the connection's CA bundle field): lab/run/vcsim/cert.pem"

lab-vcsim-stop:
	bash lab/vcsim/vcsim.sh stop

bench-vcsim:
	bash lab/bootstrap.sh venv-dev
	$(PY) bench/vcsim_sync.py
	$(PY) bench/vcsim_relocate_baseline.py 300
