# The commands the README gives. `make demo` runs the portal; `make test` runs every test.
VENV ?= .venv
# These targets run the demo, the labs and the tests on this machine: development settings
# (a deployment sets DEBUG=0, SECRET_KEY and the rest in its own environment).
export DEBUG ?= 1
PY := $(VENV)/bin/python
TEST_DATABASE_URL ?= postgres://portal:portal@127.0.0.1:5432/portal
TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: demo test lint check lab-vcsim lab-vcsim-stop lab-kvm lab-kvm-stop bench-vcsim bench-libvirt

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

# Lab peers for the demo, registered in the portal as connections (run `make demo` once first).
lab-vcsim:
	bash lab/register.sh vcsim

lab-vcsim-stop:
	bash lab/vcsim/vcsim.sh stop

lab-kvm:
	bash lab/register.sh kvm

lab-kvm-stop:
	bash lab/kvm/lab.sh down

bench-vcsim:
	bash lab/bootstrap.sh venv-dev
	$(PY) bench/vcsim_sync.py
	$(PY) bench/vcsim_relocate_baseline.py 300

bench-libvirt:
	bash lab/bootstrap.sh venv-dev
	bash lab/kvm/lab.sh install && bash lab/kvm/lab.sh up
	$(PY) bench/libvirt_overhead.py --rounds 5
	bash lab/kvm/lab.sh down
