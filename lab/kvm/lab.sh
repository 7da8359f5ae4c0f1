#!/usr/bin/env bash
# The KVM lab: two libvirt "hosts" (hosta, hostb) on this one machine, for real live migrations.
#
# Each host is a privileged libvirtd in its own network, mount and UTS namespace, with
# /etc/libvirt, /run/libvirt, /var/lib/libvirt and /var/log/libvirt bind-mounted from the lab
# folder (a system libvirtd hard-codes those paths). The hosts reach each other over a veth pair
# that exists only between the lab's two namespaces; the portal reaches each daemon through its
# unix socket from the root namespace. Guests are small TCG machines running a 512-byte boot
# sector written in this folder (guest.asm): it fills RAM, dirties a working set on a 1 kHz PIT
# tick and counts ticks at guest-physical 0x10000, so a test can prove a guest kept running.
#
# Usage: lab.sh install | up | down | status | env | purge-cache
#   install      Debian packages (only the missing ones), the libvirt-qemu user, libvirt-python in $VENV
#   up           start both hosts, pools and guests (idempotent: an up lab is left as it is)
#   down         stop everything by the pid files written at up, delete namespaces and files
#   status       what runs, with each guest's tick counter
#   env          shell exports for the portal and the tests (eval "$(lab/kvm/lab.sh env)")
#   purge-cache  remove the QEMU capability cache kept between runs
#
# Environment: LAB_KVM_DIR (run folder, default <repo>/lab/run/kvm), LAB_KVM_CACHE (QEMU
# capability cache shared by both hosts and kept across runs, default /var/cache/libvirt-lab-kvm),
# VENV (default <repo>/.venv). One lab per machine at a time: namespace names and addresses are fixed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LAB=${LAB_KVM_DIR:-$REPO/lab/run/kvm}
CACHE=${LAB_KVM_CACHE:-/var/cache/libvirt-lab-kvm}
VENV=${VENV:-$REPO/.venv}

HOSTS=(hosta hostb)
declare -A ADDR=([hosta]=10.213.77.1 [hostb]=10.213.77.2)
declare -A HOST_UUID=([hosta]=6c616b76-6d00-4a00-8000-00000000000a [hostb]=6c616b76-6d00-4a00-8000-00000000000b)
declare -A VETH=([hosta]=lkvm-a [hostb]=lkvm-b)
NS_PREFIX=lab-kvm-
LOCAL_POOLS=(images archive)   # per host, under /var/lib/libvirt/<name> inside the host
SHARED_POOL=shared             # one directory, defined as a pool on both hosts

# Guests started on hosta at up: name, boot image, memory MiB, pool, owner, tags.
GUESTS=(
  "app-1 normal 64 shared team-web env:dev"
  "app-2 normal 64 shared team-web env:production"
  "db-1 normal 64 images team-data env:production"
  "hog-1 hog 64 shared team-ops lab:never-converge"
)
DISK_MB=64        # virtual size of each guest disk
DISK_DATA_MB=24   # of which this much holds non-zero data, so disk copies move real bytes
TICK_ADDR=0x10000 # where guest.asm counts PIT ticks (keep in sync with guest.asm)

# Per-host folder -> the path libvirtd hard-codes (bind-mounted inside the host's namespace).
MOUNTS=(etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt log:/var/log/libvirt cache:/var/cache/libvirt)

PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
          libvirt-dev pkg-config nasm iproute2 gcc)

log() { echo "lab/kvm: $*" >&2; }
die() { log "error: $*"; exit 1; }
uri() { echo "qemu+unix:///system?socket=$LAB/$1/run/libvirt-sock"; }
vsh() { local host=$1; shift; virsh -q -c "$(uri "$host")" "$@"; }
now() { date +%s.%N; }
since() { printf '%.1f' "$(echo "$(now) - $1" | bc)"; }

# ---------------------------------------------------------------------------------------------
cmd_install() {
  local t0 missing=() p
  t0=$(now)
  [ "$(id -u)" = 0 ] || die "install needs root"
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Without libvirt-daemon-system nobody creates the user qemu.conf's defaults name, and
  # libvirtd refuses to start ("Failed to parse user 'libvirt-qemu'").
  getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
  getent passwd libvirt-qemu >/dev/null ||
    useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
  local want
  want=$(sed -n 's/^libvirt-python==//p' "$REPO/requirements-lab.txt")
  if [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("libvirt-python"))' 2>/dev/null || true)" != "$want" ]; then
    log "pip install -r requirements-lab.txt into $VENV"
    "$VENV/bin/pip" install -q -r "$REPO/requirements-lab.txt"
  fi
  log "install done in $(since "$t0") s"
}


# ---------------------------------------------------------------------------------------------
ns() { echo "$NS_PREFIX$1"; }
alive() { # pidfile: the process runs (a zombie nobody reaped yet counts as gone)
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

# Runs inside the new namespaces (ip netns exec + unshare): bind-mount this host's folders over
# the paths libvirtd hard-codes, then become libvirtd. Mounts die with the namespace.
cmd_host_daemon() {
  local host=$1 d
  hostname "$host"
  for d in "${MOUNTS[@]}"; do
    if [ "${d%%:*}" = cache ]; then mount --bind "$CACHE" "${d#*:}"; else mount --bind "$LAB/$host/${d%%:*}" "${d#*:}"; fi
  done
  echo $$ >"$LAB/$host/libvirtd.pid"   # exec keeps this pid: it is libvirtd's
  # Pinned to CPU 0: the QEMU capability cache records the host CPUID, which differs per CPU
  # (APIC ids), so daemons on different CPUs would throw the shared cache away (~8 s per start).
  # libvirt gives each QEMU every host CPU again, so guests are not pinned.
  exec taskset -c 0 libvirtd --listen --pid-file /run/libvirt/libvirtd.pid
}

write_configs() {
  local host=$1 etc=$LAB/$1/etc
  cat >"$etc/libvirtd.conf" <<EOF
# lab/kvm: $host. TCP without auth, bound to the veth address that exists only in the lab's namespaces.
listen_tcp = 1
listen_tls = 0
listen_addr = "${ADDR[$host]}"
auth_tcp = "none"
auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_rw_perms = "0700"
host_uuid = "${HOST_UUID[$host]}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  cat >"$etc/qemu.conf" <<EOF
# lab/kvm: $host. Root, no security driver, no virtlogd, no cgroups (two daemons would collide).
user = "root"
group = "root"
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
migration_host = "${ADDR[$host]}"
EOF
}

build_guests() {
  local img=$LAB/guest
  mkdir -p "$img"
  nasm -f bin -o "$img/normal.bin" "$HERE/guest.asm"
  # 40 MiB dirtied at 64 pages per tick (~256 MiB/s) never fits a throttled link's downtime budget.
  nasm -f bin -DWS_BYTES=0x2800000 -DPAGES_PER_TICK=64 -o "$img/hog.bin" "$HERE/guest.asm"
  for kind in normal hog; do
    truncate -s "${DISK_MB}M" "$img/$kind.raw"
    dd if="$img/$kind.bin" of="$img/$kind.raw" conv=notrunc status=none
    # Non-zero data after the first MiB: a disk copy moves real bytes, not holes.
    (set +o pipefail # yes ends on SIGPIPE by design
     yes lab-kvm-disk-data | head -c "${DISK_DATA_MB}M" |
       dd of="$img/$kind.raw" bs=1M seek=1 conv=notrunc status=none iflag=fullblock)
  done
}

pool_path() { # host pool
  if [ "$2" = "$SHARED_POOL" ]; then echo "$LAB/shared"; else echo "/var/lib/libvirt/$2"; fi
}
pool_dir_outside() { # the same folder seen from the root namespace
  if [ "$2" = "$SHARED_POOL" ]; then echo "$LAB/shared"; else echo "$LAB/$1/lib/$2"; fi
}

define_pools() {
  local host=$1 pool
  for pool in "${LOCAL_POOLS[@]}" "$SHARED_POOL"; do
    mkdir -p "$(pool_dir_outside "$host" "$pool")"
    vsh "$host" pool-define-as "$pool" dir --target "$(pool_path "$host" "$pool")" >/dev/null
    vsh "$host" pool-start "$pool" >/dev/null
    vsh "$host" pool-autostart "$pool" >/dev/null
  done
}

start_guests() {
  local line name kind mem pool owner tags disk xml
  for line in "${GUESTS[@]}"; do
    read -r name kind mem pool owner tags <<<"$line"
    disk=$(pool_path hosta "$pool")/$name.qcow2
    qemu-img convert -f raw -O qcow2 "$LAB/guest/$kind.raw" "$(pool_dir_outside hosta "$pool")/$name.qcow2"
    xml=$LAB/guest/$name.xml
    cat >"$xml" <<EOF
<domain type='qemu'>
  <name>$name</name>
  <metadata>
    <portal:vm xmlns:portal="urn:migration-portal:vm:1">
      <portal:owner>$owner</portal:owner>
      <portal:tags>$tags</portal:tags>
    </portal:vm>
  </metadata>
  <memory unit='MiB'>$mem</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
    vsh hosta define "$xml" >/dev/null
    vsh hosta start "$name" >/dev/null
  done
  for pool in "${LOCAL_POOLS[@]}" "$SHARED_POOL"; do vsh hosta pool-refresh "$pool" >/dev/null; done
  vsh hostb pool-refresh "$SHARED_POOL" >/dev/null
}

ticks() { # host domain -> the guest's tick counter (empty when unreadable)
  vsh "$1" qemu-monitor-command --hmp "$2" "xp /1wd $TICK_ADDR" 2>/dev/null | awk '{print $2}' | tr -d '\r'
}

wait_for() { # seconds description command...
  local limit=$1 what=$2 t0 host
  shift 2
  t0=$(now)
  until "$@" >/dev/null 2>&1; do
    for host in "${HOSTS[@]}"; do
      # No pid file yet = still starting; a pid file whose process is gone = died.
      [ ! -e "$LAB/$host/libvirtd.pid" ] || alive "$LAB/$host/libvirtd.pid" || die "libvirtd on $host died: $(tail -3 "$LAB/$host/log/libvirtd.log" "$LAB/$host/daemon.out" 2>/dev/null)"
    done
    if [ "$(echo "$(now) - $t0 > $limit" | bc)" = 1 ]; then die "timed out after ${limit} s waiting for $what"; fi
    sleep 0.1
  done
}

guest_ticking() { local t; t=$(ticks "$1" "$2"); [ -n "$t" ] && [ "$t" -gt 0 ]; }

is_up() {
  local host
  for host in "${HOSTS[@]}"; do
    alive "$LAB/$host/libvirtd.pid" || return 1
    vsh "$host" version >/dev/null 2>&1 || return 1
  done
}

cmd_up() {
  local t0 host pool line name
  t0=$(now)
  [ "$(id -u)" = 0 ] || die "up needs root"
  for p in libvirtd virsh qemu-system-x86_64 qemu-img nasm ip unshare; do
    command -v "$p" >/dev/null || die "$p is missing: run $0 install"
  done
  if is_up; then log "already up ($LAB)"; return 0; fi
  if [ -e "$LAB" ] || ip netns list | grep -q "^$NS_PREFIX"; then log "cleaning a half-started lab"; cmd_down; fi
  # A failed up leaves nothing behind either (the error above says why it failed).
  trap 'log "up failed; tearing down"; cmd_down' EXIT

  mkdir -p "$CACHE" "$LAB/shared"
  # Mount points missing on this machine are made here and listed, so down removes them again.
  for d in "${MOUNTS[@]}"; do
    [ -d "${d#*:}" ] || { mkdir -p "${d#*:}" && echo "${d#*:}" >>"$LAB/made-mountpoints"; }
  done
  for host in "${HOSTS[@]}"; do
    mkdir -p "$LAB/$host"/{etc,run,lib,log}
    write_configs "$host"
    ip netns add "$(ns "$host")"
    ip -n "$(ns "$host")" link set lo up
  done
  ip link add "${VETH[hosta]}" netns "$(ns hosta)" type veth peer name "${VETH[hostb]}" netns "$(ns hostb)"
  for host in "${HOSTS[@]}"; do
    ip -n "$(ns "$host")" addr add "${ADDR[$host]}/30" dev "${VETH[$host]}"
    ip -n "$(ns "$host")" link set "${VETH[$host]}" up
  done
  build_guests &
  local builder=$!
  for host in "${HOSTS[@]}"; do
    # setsid: the daemons must not share the caller's process group (a test runner's ^C).
    setsid ip netns exec "$(ns "$host")" unshare --uts --mount --propagation private \
      "$HERE/lab.sh" _host-daemon "$host" </dev/null >"$LAB/$host/daemon.out" 2>&1 &
  done
  for host in "${HOSTS[@]}"; do
    wait_for 90 "libvirtd on $host (see $LAB/$host/log/libvirtd.log)" vsh "$host" version
  done
  log "daemons answer after $(since "$t0") s"
  wait "$builder"
  for host in "${HOSTS[@]}"; do define_pools "$host"; done
  start_guests
  for line in "${GUESTS[@]}"; do
    read -r name _ <<<"$line"
    wait_for 30 "guest $name to tick" guest_ticking hosta "$name"
  done
  trap - EXIT
  log "up in $(since "$t0") s: $LAB"
}

cmd_down() {
  local t0 host pid f dom
  t0=$(now)
  for host in "${HOSTS[@]}"; do
    # Guests by the pid files their daemon wrote (driver.pid is the daemon's own): SIGKILL is
    # instant, where "virsh destroy" waits ~1.5 s per TCG guest. The daemon sees them go.
    for f in "$LAB/$host"/run/qemu/*.pid; do
      [ "${f##*/}" != driver.pid ] && [ -s "$f" ] || continue
      pid=$(cat "$f")
      case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in */qemu-system-*) kill -KILL "$pid" ;; esac
    done
    if alive "$LAB/$host/libvirtd.pid"; then kill -TERM "$(cat "$LAB/$host/libvirtd.pid")"; fi
  done
  for host in "${HOSTS[@]}"; do
    f=$LAB/$host/libvirtd.pid
    for _ in $(seq 100); do alive "$f" || break; sleep 0.1; done
    if alive "$f"; then kill -KILL "$(cat "$f")"; sleep 0.2; fi
    ip netns del "$(ns "$host")" 2>/dev/null || true
  done
  if [ -s "$LAB/made-mountpoints" ]; then
    while read -r f; do rmdir --ignore-fail-on-non-empty "$f"; done <"$LAB/made-mountpoints"
  fi
  rm -rf "$LAB"
  log "down in $(since "$t0") s"
}

cmd_status() {
  local host name state
  for host in "${HOSTS[@]}"; do
    if alive "$LAB/$host/libvirtd.pid"; then
      echo "$host: libvirtd pid $(cat "$LAB/$host/libvirtd.pid"), $(uri "$host")"
      vsh "$host" list --all --name 2>/dev/null | while read -r name; do
        [ -n "$name" ] || continue
        state=$(vsh "$host" domstate "$name" 2>/dev/null)
        echo "  $name: $state${state:+, ticks $(ticks "$host" "$name")}"
      done
    else
      echo "$host: down"
    fi
  done
}

cmd_env() {
  local host hosts_json="" sep=""
  echo "export LAB_KVM_DIR='$LAB'"
  for host in "${HOSTS[@]}"; do
    echo "export LAB_KVM_${host^^}_URI='$(uri "$host")'"
    echo "export LAB_KVM_${host^^}_MIGRATION_URI='qemu+tcp://${ADDR[$host]}/system'"
    hosts_json+="$sep{\"name\": \"$host\", \"uri\": \"$(uri "$host")\", \"migration_uri\": \"qemu+tcp://${ADDR[$host]}/system\", \"cluster\": \"lab\"}"
    sep=", "
  done
  # ConnectionConfig.options for drivers.libvirt.LibvirtDriver.
  echo "export LAB_KVM_DRIVER_OPTIONS='{\"hosts\": [$hosts_json], \"shared_pools\": [\"$SHARED_POOL\"]}'"
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  purge-cache) rm -rf "$CACHE" ;;
  _host-daemon) cmd_host_daemon "$2" ;;
  *) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
