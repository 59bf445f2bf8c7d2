#!/bin/bash
# network.sh up|down|name|status -- the isolated libvirt network of the
# rapid-vmm system tests.
#
#   up      define + start it (idempotent); refuses a network of that name
#           that has a <forward> element (tests never use NAT/routed networks)
#   down    destroy + undefine it (idempotent)
#   name    print its name
#   status  print `virsh net-info` and the current DHCP leases
#
# The network has NO <forward> element: it is isolated (guests reach the host
# bridge and each other only).  libvirt's dnsmasq serves DHCP on it, so guest
# addresses are visible with `virsh domifaddr --source lease`.
#
# Env overrides: RAPID_TEST_NET (rapid-vmm-test), RAPID_TEST_BRIDGE
# (rvmmtest0), RAPID_TEST_SUBNET (192.168.250: first three octets of a /24).
set -euo pipefail

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

NET=${RAPID_TEST_NET:-rapid-vmm-test}
BRIDGE=${RAPID_TEST_BRIDGE:-rvmmtest0}
SUBNET=${RAPID_TEST_SUBNET:-192.168.250}
URI=qemu:///system
VIRSH=(timeout 60 virsh -q -c "$URI")

log() { echo "network: $*" >&2; }
die() { echo "network: ERROR: $*" >&2; exit 1; }

[[ $NET =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad network name '$NET'"
[[ $BRIDGE =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || die "bad bridge name '$BRIDGE'"
[[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "RAPID_TEST_SUBNET must be like 192.168.250"

defined() { "${VIRSH[@]}" net-info "$NET" >/dev/null 2>&1; }
# (no `producer | grep -q`: with pipefail an early grep exit is a SIGPIPE failure)
active() {
    local info
    info=$("${VIRSH[@]}" net-info "$NET" 2>/dev/null) || return 1
    grep -Eq '^Active:[[:space:]]+yes' <<<"$info"
}

# dnsmasq 'no-ping': by default dnsmasq pings an address for 3 s before
# offering it; on this throw-away network that only delays every boot by 3 s.
net_xml() {
    cat <<EOF
<network xmlns:dnsmasq='http://libvirt.org/schemas/network/dnsmasq/1.0'>
  <name>$NET</name>
  <bridge name='$BRIDGE' stp='off' delay='0'/>
  <ip address='$SUBNET.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='$SUBNET.10' end='$SUBNET.250'/>
    </dhcp>
  </ip>
  <dnsmasq:options>
    <dnsmasq:option value='no-ping'/>
  </dnsmasq:options>
</network>
EOF
}

up() {
    if defined; then
        local cur
        cur=$("${VIRSH[@]}" net-dumpxml "$NET")
        if grep -q '<forward' <<<"$cur"; then
            die "network '$NET' exists and has a <forward> element; refusing to use it"
        fi
    else
        # The subnet and bridge must not be in use by anything else.
        local addrs
        addrs=$(ip -4 -o addr show)
        if grep -v " $BRIDGE " <<<"$addrs" | grep -q " inet $SUBNET\."; then
            die "subnet $SUBNET.0/24 is already used on this host (set RAPID_TEST_SUBNET)"
        fi
        if ip link show "$BRIDGE" >/dev/null 2>&1; then
            die "interface $BRIDGE already exists but network '$NET' is not defined"
        fi
        local xml
        xml=$(mktemp "${TMPDIR:-/tmp}/rapid-net.XXXXXX.xml")
        net_xml >"$xml"
        if ! "${VIRSH[@]}" net-define "$xml" >/dev/null; then
            rm -f "$xml"
            die "net-define failed"
        fi
        rm -f "$xml"
        log "defined $NET (bridge $BRIDGE, $SUBNET.0/24, DHCP $SUBNET.10-250, isolated, dnsmasq no-ping)"
    fi
    if active; then
        log "$NET already active"
    else
        "${VIRSH[@]}" net-start "$NET" >/dev/null
        log "started $NET"
    fi
    active || die "$NET is not active"
}

down() {
    if active; then
        "${VIRSH[@]}" net-destroy "$NET" >/dev/null
        log "destroyed $NET"
    fi
    if defined; then
        "${VIRSH[@]}" net-undefine "$NET" >/dev/null
        log "undefined $NET"
    fi
    if ! defined; then
        log "$NET is gone"
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    name) echo "$NET" ;;
    status)
        if defined; then
            "${VIRSH[@]}" net-info "$NET"
            "${VIRSH[@]}" net-dhcp-leases "$NET" || true
        else
            echo "$NET: not defined"
        fi
        ;;
    *) die "usage: $0 up|down|name|status" ;;
esac
