#!/usr/bin/env bash
# Start a lab peer and register it in the portal (the demo's database) as a hypervisor connection.
#   bash lab/register.sh vcsim     a vcsim vCenter (2 clusters x 3 hosts, 4 VMs per host, 3 datastores)
#   bash lab/register.sh kvm       the two-host KVM lab (libvirt + QEMU guests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
export DEBUG=${DEBUG:-1}  # the demo's settings

case "${1:-}" in
  vcsim)
    bash lab/vcsim/vcsim.sh start -dc 1 -cluster 2 -host 3 -standalone 0 -vm 4 -ds 3 >/dev/null
    url=$(bash lab/vcsim/vcsim.sh url)
    # https://user:pass@127.0.0.1:PORT/sdk -> the URL without credentials, user, password apart.
    creds=${url#https://}; creds=${creds%%@*}
    endpoint="https://${url#*@}"
    VCSIM_PASSWORD=${creds#*:} "$PY" manage.py connection_add --name vcsim --kind vcenter \
      --url "$endpoint" --username "${creds%%:*}" --password-env VCSIM_PASSWORD \
      --ca-bundle lab/run/vcsim/cert.pem
    ;;
  kvm)
    bash lab/kvm/lab.sh install
    bash lab/kvm/lab.sh up
    eval "$(bash lab/kvm/lab.sh env)"
    "$PY" manage.py connection_add --name kvm-lab --kind libvirt --lab --options "$LAB_KVM_DRIVER_OPTIONS"
    ;;
  *) sed -n '2,4p' "$0"; exit 2 ;;
esac
