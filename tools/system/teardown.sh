#!/bin/bash
# teardown.sh [--stop-daemons] -- undo what the rapid-vmm system tests leave.
#
#  * destroys and undefines every domain on qemu:///system whose name starts
#    with "rapid-" or "rvmm-" (managed-save images and snapshot metadata too);
#  * destroys and undefines the test network (network.sh down);
#  * with --stop-daemons, then stops libvirtd and virtlogd (SIGTERM, bounded
#    wait, SIGKILL); without it no daemon is touched.
# Disk files are not deleted: they belong to whoever created them.
set -euo pipefail

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
URI=qemu:///system
VIRSH=(timeout 60 virsh -q -c "$URI")

log() { echo "teardown: $*" >&2; }
die() { echo "teardown: ERROR: $*" >&2; exit 1; }

STOP_DAEMONS=0
for a in "$@"; do
    case $a in
        --stop-daemons) STOP_DAEMONS=1 ;;
        *) die "usage: $0 [--stop-daemons]" ;;
    esac
done
[ "$(id -u)" -eq 0 ] || die "must run as root"

# stop_daemon NAME: SIGTERM the daemon (pid file, else processes of that exact
# name), wait up to 30 s, then SIGKILL.
stop_daemon() {
    local name=$1 pids=() pid comm
    if [ -r "/run/$name.pid" ]; then
        pid=$(tr -dc '0-9' <"/run/$name.pid")
        if [ -n "$pid" ]; then
            comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
            [ "$comm" = "$name" ] && pids+=("$pid")
        fi
    fi
    if [ "${#pids[@]}" -eq 0 ]; then
        mapfile -t pids < <(pgrep -x "$name" || true)
    fi
    if [ "${#pids[@]}" -eq 0 ]; then
        log "$name not running"
        return 0
    fi
    log "stopping $name (pid ${pids[*]})"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 300); do
        alive=0
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" -eq 0 ] && return 0
        sleep 0.1
    done
    log "$name did not stop in 30 s: SIGKILL"
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

if timeout 15 virsh -c "$URI" version >/dev/null 2>&1; then
    mapfile -t doms < <("${VIRSH[@]}" list --all --name | grep -E '^(rapid-|rvmm-)' || true)
    for d in "${doms[@]}"; do
        [ -n "$d" ] || continue
        state=$("${VIRSH[@]}" domstate "$d" 2>/dev/null || true)
        if [ -n "$state" ] && [ "$state" != "shut off" ]; then
            "${VIRSH[@]}" destroy "$d" >/dev/null 2>&1 || log "destroy $d failed (already off?)"
        fi
        info=$("${VIRSH[@]}" dominfo "$d" 2>/dev/null || true)
        if grep -Eq '^Persistent:[[:space:]]+yes' <<<"$info"; then
            "${VIRSH[@]}" undefine --managed-save --snapshots-metadata "$d" >/dev/null 2>&1 \
                || "${VIRSH[@]}" undefine "$d" >/dev/null
        fi
        log "removed domain $d"
    done
    [ "${#doms[@]}" -gt 0 ] || log "no rapid-/rvmm- domains"
    "$HERE/network.sh" down
else
    log "libvirtd does not answer on $URI: no domain or network to clean"
fi

if [ "$STOP_DAEMONS" -eq 1 ]; then
    stop_daemon libvirtd
    stop_daemon virtlogd
fi
log "done"
