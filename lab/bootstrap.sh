#!/usr/bin/env bash
# Installs and starts what the portal and its tests need on a Debian machine where you are root.
# Every step checks first and does nothing when its thing is already there.
#   bash lab/bootstrap.sh venv        virtualenv with the pinned runtime requirements
#   bash lab/bootstrap.sh venv-dev    ... plus the test requirements
#   bash lab/bootstrap.sh redis       Redis on 127.0.0.1:6379 (installed from Debian if absent)
#   bash lab/bootstrap.sh postgres    PostgreSQL on 127.0.0.1:5432 with a role and database "portal"
#   bash lab/bootstrap.sh chromium    Debian's chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
APT_UPDATED=""

log() { printf '[bootstrap] %s\n' "$*" >&2; }

apt_install() {
  [ -n "$APT_UPDATED" ] || { log "apt-get update"; apt-get update -qq; APT_UPDATED=1; }
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done
  log "nothing answers on 127.0.0.1:$1"; return 1
}

venv() {
  local reqs=$1
  if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv python3-dev gcc
  fi
  [ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  local stamp
  stamp="$VENV/.installed-$(cat "$reqs" requirements.txt | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    log "installing $reqs into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -r "$reqs"
    touch "$stamp"
  fi
}

redis() {
  port_open 6379 && return 0
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/portal.log
  wait_port 6379
}

postgres() {
  if ! port_open 5432; then
    ls /etc/postgresql/*/main >/dev/null 2>&1 || apt_install postgresql
  fi
  if ! port_open 5432; then  # the package may have started the cluster itself
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || port_open 5432
    wait_port 5432
  fi
  # A password role works whatever pg_hba says for TCP (trust here, scram on a stock install).
  su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='portal'\"" | grep -q 1 ||
    su postgres -c "psql -qc \"CREATE ROLE portal LOGIN CREATEDB PASSWORD 'portal'\""
  su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='portal'\"" | grep -q 1 ||
    su postgres -c "psql -qc 'CREATE DATABASE portal OWNER portal'"
}

chromium() {
  [ -x /usr/bin/chromium ] || apt_install chromium fonts-dejavu-core
}

[ $# -gt 0 ] || { sed -n '2,9p' "$0"; exit 2; }
for step in "$@"; do
  case "$step" in
    venv) venv requirements.txt ;;
    venv-dev) venv requirements-dev.txt ;;
    redis|postgres|chromium) "$step" ;;
    *) log "unknown step $step"; exit 2 ;;
  esac
done
