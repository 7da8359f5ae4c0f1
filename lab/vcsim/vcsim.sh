#!/usr/bin/env bash
# vcsim, the vCenter API peer of the lab: govmomi's simulator built from Debian's packages.
#
#   lab/vcsim/vcsim.sh install          apt-get the Go toolchain and govmomi source (only if missing)
#   lab/vcsim/vcsim.sh build            build lab/.cache/vcsim/vcsim (again only if main.go changed)
#   lab/vcsim/vcsim.sh start [flags]    start in the background, wait until it answers, print the URL
#                                       flags go to main.go: -dc -cluster -host -standalone -vm -ds
#                                       -relocate-delay-ms -off -tools -disable
#   lab/vcsim/vcsim.sh stop             stop it (by its pid file only) and remove its run files
#   lab/vcsim/vcsim.sh url | status
#
# Run files live in $VCSIM_RUN_DIR (default lab/run/vcsim): pid, url, cert.pem (the server's
# self-signed certificate, for TLS verification), args, vcsim.log, tmp/ (the datastores' folders).
# Every subcommand is idempotent; `start` with other flags than the running instance's fails.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAB="$(dirname "$HERE")"
CACHE="${VCSIM_CACHE_DIR:-$LAB/.cache/vcsim}"
RUN="${VCSIM_RUN_DIR:-$LAB/run/vcsim}"
BIN="$CACHE/vcsim"
GOVMOMI=/usr/share/gocode/src/github.com/vmware/govmomi/simulator
START_TIMEOUT="${VCSIM_START_TIMEOUT:-180}"  # seconds; a 10,000-VM model takes ~11 s to create

die() { echo "vcsim: $*" >&2; exit 1; }

cmd_install() {
    if command -v go >/dev/null && [ -d "$GOVMOMI" ]; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "installing packages needs root"
    # A fresh machine may have empty package lists: refresh them only then.
    if ! apt-cache policy golang-github-vmware-govmomi-dev 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt-get update -q
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go golang-github-vmware-govmomi-dev
}

cmd_build() {
    cmd_install
    mkdir -p "$CACHE"
    # One build at a time (parallel test sessions may all ask for it).
    exec 9>"$CACHE/.build.lock"
    flock 9
    local want
    want="$(cat "$HERE/main.go" "$(command -v go)" | sha256sum | cut -d' ' -f1)"
    if [ -x "$BIN" ] && [ "$(cat "$BIN.sha256" 2>/dev/null)" = "$want" ]; then
        exec 9>&-
        return 0
    fi
    echo "vcsim: building $BIN" >&2
    (cd "$HERE" && GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS= GOCACHE="$CACHE/go-build" \
        go build -o "$BIN.new" main.go)
    mv -f "$BIN.new" "$BIN"
    echo "$want" >"$BIN.sha256"
    exec 9>&-
}

# The pid of the running vcsim, from the pid file; fails if none (a recycled pid does not count).
running_pid() {
    local pid
    pid="$(cat "$RUN/pid" 2>/dev/null)" || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    case "$(tr '\0' ' ' <"/proc/$pid/cmdline")" in
        "$BIN "*) ;;
        *) return 1 ;;
    esac
    echo "$pid"
}

cmd_start() {
    local args="$*" pid port
    if pid="$(running_pid)"; then
        [ "$(cat "$RUN/args")" = "$args" ] ||
            die "already running (pid $pid) with flags '$(cat "$RUN/args")'; stop it first"
        cat "$RUN/url"
        return 0
    fi
    cmd_build
    rm -rf "$RUN"
    mkdir -p "$RUN/tmp"
    echo "$args" >"$RUN/args"
    # TMPDIR: the simulator backs each datastore with a temporary folder; keep them in the run dir.
    TMPDIR="$RUN/tmp" "$BIN" -cert "$RUN/cert.pem" "$@" </dev/null >"$RUN/vcsim.log" 2>&1 &
    echo $! >"$RUN/pid"
    local deadline=$((SECONDS + START_TIMEOUT))
    until grep -q '^URL=' "$RUN/vcsim.log"; do
        if ! running_pid >/dev/null; then
            cat "$RUN/vcsim.log" >&2
            cmd_stop
            die "vcsim exited during start"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            cmd_stop
            die "vcsim did not print its URL within ${START_TIMEOUT}s"
        fi
        sleep 0.1
    done
    sed -n 's/^URL=//p' "$RUN/vcsim.log" | head -n1 >"$RUN/url"
    # The URL is printed once the listener is up; prove it accepts a connection all the same.
    port="$(sed -E 's#.*:([0-9]+)/sdk$#\1#' "$RUN/url")"
    (exec 3<>"/dev/tcp/127.0.0.1/$port") || { cmd_stop; die "vcsim does not answer on port $port"; }
    cat "$RUN/url"
}

cmd_stop() {
    local pid
    if pid="$(running_pid)"; then
        kill -TERM "$pid"
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid"
        fi
    fi
    rm -rf "$RUN"
}

cmd_url() {
    running_pid >/dev/null || die "not running"
    cat "$RUN/url"
}

cmd_status() {
    local pid
    if pid="$(running_pid)"; then
        echo "running pid=$pid url=$(cat "$RUN/url" 2>/dev/null) flags='$(cat "$RUN/args")'"
    else
        echo "stopped"
        return 3
    fi
}

sub="${1:-}"
[ $# -gt 0 ] && shift
case "$sub" in
    install) cmd_install ;;
    build) cmd_build ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop ;;
    url) cmd_url ;;
    status) cmd_status ;;
    *) die "usage: $0 install|build|start [flags]|stop|url|status" ;;
esac
