#!/bin/bash
# setup-host.sh -- prepare this (Debian 12, no systemd, root) host for
# rapid-vmm system tests with real QEMU guests under libvirtd.
#
#  * installs the Debian packages needed (only when one is missing);
#  * makes sure libvirt's NAT network 'default' is NOT autostarted (tests
#    must never start a <forward> network);
#  * starts virtlogd and libvirtd as daemons when they are not running;
#  * waits (bounded) until `virsh -c qemu:///system version` answers.
#
# Idempotent: a second run on a ready host only checks and returns (~0.1 s).
# Env: RAPID_SETUP_TIMEOUT  seconds to wait for libvirtd (default 90).
set -euo pipefail

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

log() { echo "setup-host: $*" >&2; }
die() { echo "setup-host: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
TIMEOUT=${RAPID_SETUP_TIMEOUT:-90}
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "RAPID_SETUP_TIMEOUT must be an integer"
URI=qemu:///system

# libvirt + QEMU (TCG), qemu-img, the guest's busybox, initramfs tools,
# kmod (depmod/modprobe resolve the guest kernel's module order), dnsmasq
# (DHCP on libvirt networks), iproute2, util-linux (flock), procps (pgrep).
PACKAGES=(libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
    busybox-static cpio kmod dnsmasq-base iproute2 util-linux procps gzip)

missing=()
for p in "${PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]; then
        missing+=("$p")
    fi
done

apt_updated=0
apt_update() {
    [ "$apt_updated" -eq 1 ] && return 0
    log "apt-get update"
    apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 update -q >&2
    apt_updated=1
}

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 \
        install -y -q "${missing[@]}" >&2
else
    log "packages already installed"
fi

# build-guest.sh resolves and downloads linux-image-amd64's target: it needs
# package lists.
policy=$(apt-cache policy linux-image-amd64 2>/dev/null || true)
if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
    apt_update
fi

# Never let libvirtd autostart its NAT network 'default'.
if [ -e /etc/libvirt/qemu/networks/autostart/default.xml ] \
   || [ -L /etc/libvirt/qemu/networks/autostart/default.xml ]; then
    log "disabling autostart of libvirt's NAT network 'default'"
    rm -f /etc/libvirt/qemu/networks/autostart/default.xml
fi

# pid_alive PIDFILE NAME: the pid file names a live process called NAME.
pid_alive() {
    local pid comm
    [ -r "$1" ] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [ -n "$pid" ] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [ "$comm" = "$2" ]
}

running() {
    # pid file first (what we start writes one), any process of that name next
    pid_alive "/run/$1.pid" "$1" || pgrep -x "$1" >/dev/null 2>&1
}

mkdir -p /var/log/libvirt

if running virtlogd; then
    log "virtlogd already running"
else
    log "starting virtlogd"
    virtlogd -d
fi
for _ in $(seq 1 100); do
    [ -S /run/libvirt/virtlogd-sock ] && break
    sleep 0.1
done
[ -S /run/libvirt/virtlogd-sock ] || die "virtlogd socket did not appear in 10 s"

started=0
if running libvirtd; then
    log "libvirtd already running"
else
    log "starting libvirtd (log: /var/log/libvirt/libvirtd.log)"
    LIBVIRT_LOG_OUTPUTS="3:file:/var/log/libvirt/libvirtd.log" libvirtd -d
    started=1
fi

t0=$(date +%s)
deadline=$((t0 + TIMEOUT))
until timeout 15 virsh -c "$URI" version >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        tail -n 20 /var/log/libvirt/libvirtd.log >&2 2>/dev/null || true
        die "libvirtd did not answer on $URI within ${TIMEOUT} s"
    fi
    if ! running libvirtd; then
        tail -n 20 /var/log/libvirt/libvirtd.log >&2 2>/dev/null || true
        die "libvirtd is not running"
    fi
    sleep 0.5
done
if [ "$started" -eq 1 ]; then
    log "libvirtd answered after $(( $(date +%s) - t0 )) s"
fi

# Refuse to go on if a forwarding (NAT) network 'default' is somehow active:
# tests must not depend on it.  We do not stop it: it is not ours.
definfo=$(timeout 15 virsh -c "$URI" net-info default 2>/dev/null || true)
if grep -Eq '^Active:[[:space:]]+yes' <<<"$definfo"; then
    log "WARNING: libvirt network 'default' (NAT) is active on this host; tests use the isolated network from network.sh"
fi

virsh -c "$URI" version | sed 's/^/setup-host: /' >&2
log "ready ($URI; domains must use <domain type='qemu'>: no KVM here)"
