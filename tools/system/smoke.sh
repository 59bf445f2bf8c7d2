#!/bin/bash
# smoke.sh -- end-to-end proof that a real guest runs under libvirtd + QEMU
# (TCG) on this host the way rapid-vmm's system tests need it.
#
# setup-host -> build-guest (temp dir) -> network up -> qcow2 overlay of the
# template -> define + start a domain -> DHCP lease (virsh domifaddr --source
# lease) + serial marker -> domstats -> suspend/resume -> live setvcpus and
# setmem -> libvirtd killed (SIGKILL) and restarted under the running guest ->
# ACPI shutdown -> destroy + undefine -> overlay deleted -> network down.
#
# Prints timings and a summary; exits non-zero when a required check fails.
# Cleans up after itself also on failure (trap).
#
# Env: RAPID_SMOKE_BOOT_TIMEOUT  seconds to wait for the lease (default 90)
#      RAPID_SMOKE_GUEST_DIR     build/reuse the guest there instead of the
#                                temp dir (cached by build-guest.sh)
#      RAPID_SMOKE_KEEP=1        keep the temp dir (serial log, XML)
set -euo pipefail

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
URI=qemu:///system
VIRSH=(timeout 60 virsh -q -c "$URI")
BOOT_TIMEOUT=${RAPID_SMOKE_BOOT_TIMEOUT:-90}
[[ $BOOT_TIMEOUT =~ ^[0-9]+$ ]] || { echo "RAPID_SMOKE_BOOT_TIMEOUT must be an integer" >&2; exit 2; }
DOM=rvmm-smoke-$$
T0=${EPOCHREALTIME/./}

# --- helpers -----------------------------------------------------------------
now_us() { echo "${EPOCHREALTIME/./}"; }
# secs SINCE_US -> "12.3"
secs() {
    local d
    d=$(( $(now_us) - $1 ))
    printf '%d.%d' $((d / 1000000)) $(((d % 1000000) / 100000))
}
log() { echo "smoke [$(secs "$T0")s] $*" >&2; }

declare -a SUMMARY=()
FAILED=0
pass() { SUMMARY+=("PASS  $*"); log "PASS: $*"; }
fail() { SUMMARY+=("FAIL  $*"); log "FAIL: $*"; FAILED=1; }
info() { SUMMARY+=("INFO  $*"); log "INFO: $*"; }
timing() { SUMMARY+=("TIME  $*"); log "TIME: $*"; }

domstate() { "${VIRSH[@]}" domstate "$DOM" 2>/dev/null || true; }
lease_ip() {
    local out
    out=$("${VIRSH[@]}" domifaddr "$DOM" --source lease 2>/dev/null || true)
    awk '$3 == "ipv4" { sub(/\/.*/, "", $4); print $4; exit }' <<<"$out"
}
serial_count() { grep -c "$1" "$SERIAL" 2>/dev/null || true; }
# wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.2 s, bounded.
wait_for() {
    local limit=$1 what=$2 start
    shift 2
    start=$(now_us)
    while (( $(now_us) - start < limit * 1000000 )); do
        if "$@"; then return 0; fi
        sleep 0.2
    done
    log "timed out after ${limit}s waiting for: $what"
    return 1
}
qemu_pid() { tr -dc '0-9' <"/run/libvirt/qemu/$DOM.pid" 2>/dev/null || true; }
virsh_answers() { timeout 10 virsh -c "$URI" version >/dev/null 2>&1; }

# --- cleanup -----------------------------------------------------------------
WORK=
NET_UP=0
cleanup() {
    local rc=$?
    set +e
    if [ -n "$DOM" ] && timeout 10 virsh -c "$URI" dominfo "$DOM" >/dev/null 2>&1; then
        log "cleanup: removing domain $DOM"
        timeout 30 virsh -c "$URI" destroy "$DOM" >/dev/null 2>&1
        timeout 30 virsh -c "$URI" undefine --managed-save "$DOM" >/dev/null 2>&1
    fi
    if [ "$NET_UP" -eq 1 ]; then
        "$HERE/network.sh" down
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "${RAPID_SMOKE_KEEP:-0}" = 1 ] || [ "$rc" -ne 0 ] || [ "$FAILED" -ne 0 ]; then
            log "kept $WORK (serial log: $WORK/serial.log)"
        else
            rm -rf -- "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT

# --- 1. host -------------------------------------------------------------------
t=$(now_us)
"$HERE/setup-host.sh"
timing "setup-host.sh: $(secs "$t") s"

# --- 2. guest ------------------------------------------------------------------
# 0755: QEMU runs as libvirt-qemu and must reach the kernel, initrd, template.
WORK=$(mktemp -d /tmp/rvmm-smoke.XXXXXX)
chmod 0755 "$WORK"
GUEST=${RAPID_SMOKE_GUEST_DIR:-$WORK/guest}
t=$(now_us)
"$HERE/build-guest.sh" "$GUEST"
timing "build-guest.sh: $(secs "$t") s"
# shellcheck source=/dev/null
. "$GUEST/guest.env"

# --- 3. network ----------------------------------------------------------------
NET=$("$HERE/network.sh" name)
t=$(now_us)
NET_UP=1
"$HERE/network.sh" up
timing "network.sh up: $(secs "$t") s"

# --- 4. overlay ----------------------------------------------------------------
OVERLAY=$WORK/$DOM.qcow2
SERIAL=$WORK/serial.log
t=$(now_us)
qemu-img create -q -f qcow2 -F qcow2 -b "$RAPID_GUEST_TEMPLATE" "$OVERLAY"
timing "qemu-img overlay create: $(( ($(now_us) - t) / 1000 )) ms"
chmod 0644 "$OVERLAY"

# --- 5. domain -----------------------------------------------------------------
XML=$WORK/$DOM.xml
cat >"$XML" <<EOF
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='MiB'>256</memory>
  <currentMemory unit='MiB'>128</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$RAPID_GUEST_KERNEL</kernel>
    <initrd>$RAPID_GUEST_INITRD</initrd>
    <cmdline>$RAPID_GUEST_CMDLINE</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$OVERLAY'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='$NET'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='$SERIAL' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='virtio'>
      <stats period='2'/>
    </memballoon>
  </devices>
</domain>
EOF
"${VIRSH[@]}" define "$XML" >/dev/null
t=$(now_us)
"${VIRSH[@]}" start "$DOM" >/dev/null
T_START=$t
timing "virsh start returned: $(secs "$t") s"
QPID=$(qemu_pid)
info "qemu pid $QPID runs as user '$(ps -o user= -p "$QPID" 2>/dev/null | tr -d ' ')'"

# --- 6. lease + serial marker ------------------------------------------------
have_lease() { IP=$(lease_ip); [ -n "$IP" ]; }
IP=
if wait_for "$BOOT_TIMEOUT" "DHCP lease" have_lease; then
    T_LEASE=$(secs "$T_START")
    pass "DHCP lease $IP via 'virsh domifaddr --source lease'"
    timing "start -> lease: $T_LEASE s"
else
    fail "no DHCP lease within ${BOOT_TIMEOUT}s"
    tail -n 20 "$SERIAL" >&2 || true
    exit 1
fi
marker_seen() { grep -q "^$RAPID_GUEST_READY_MARKER " "$SERIAL" 2>/dev/null; }
if wait_for 20 "serial marker" marker_seen; then
    line=$(grep -m1 "^$RAPID_GUEST_READY_MARKER " "$SERIAL" | tr -d '\r')
    timing "start -> serial marker: $(secs "$T_START") s"
    if [ "$line" = "$RAPID_GUEST_READY_MARKER $IP" ]; then
        pass "serial marker '$line' matches the lease"
    else
        fail "serial marker '$line' does not match lease $IP"
    fi
else
    fail "no '$RAPID_GUEST_READY_MARKER' on the serial console"
fi
devices=$(grep -m1 '^RAPID-GUEST-DEVICES' "$SERIAL" | tr -d '\r' || true)
if grep -q 'disks=vda:' <<<"$devices"; then
    pass "guest sees its disk: $devices"
else
    fail "guest does not report vda: '$devices'"
fi
boot_line=$(grep -m1 '^RAPID-GUEST-BOOT' "$SERIAL" | tr -d '\r' || true)
info "$boot_line (guest seconds since kernel start; the rest of start->lease is SeaBIOS + kernel decompression under TCG)"
info "$(grep -m1 '^RAPID-GUEST-LEASE' "$SERIAL" | tr -d '\r' || true)"

# --- 7. domstats ---------------------------------------------------------------
balloon_guest_stats() {
    local s
    s=$("${VIRSH[@]}" domstats --balloon "$DOM" 2>/dev/null || true)
    grep -q 'balloon.usable=' <<<"$s"
}
wait_for 20 "guest balloon stats" balloon_guest_stats || true
STATS=$("${VIRSH[@]}" domstats --state --cpu-total --balloon --vcpu --interface --block "$DOM")
echo "---- virsh domstats $DOM ----" >&2
echo "$STATS" >&2
echo "-----------------------------" >&2
for key in cpu.time balloon.current balloon.maximum balloon.rss block.0.capacity block.0.allocation; do
    if grep -q "^ *$key=" <<<"$STATS"; then
        pass "domstats has $key ($(grep -m1 "^ *$key=" <<<"$STATS" | tr -d ' '))"
    else
        fail "domstats lacks $key"
    fi
done
info "balloon stats present: $(grep -o 'balloon\.[a-z_]*' <<<"$STATS" | sed 's/balloon\.//' | sort -u | tr '\n' ' ')"

# --- 8. suspend / resume -------------------------------------------------------
alive_count() { serial_count '^RAPID-GUEST-ALIVE'; }
first_heartbeat() { [ "$(alive_count)" -gt 0 ]; }
wait_for 30 "first heartbeat" first_heartbeat || fail "no RAPID-GUEST-ALIVE heartbeat on the serial console"
t=$(now_us)
"${VIRSH[@]}" suspend "$DOM" >/dev/null
st=$(domstate)
if [ "$st" = paused ]; then
    pass "suspend -> state '$st' ($(( ($(now_us) - t) / 1000 )) ms)"
else
    fail "suspend -> state '$st'"
fi
before=$(alive_count)
sleep 6
during=$(alive_count)
if [ "$during" = "$before" ]; then
    pass "no heartbeat while paused ($before)"
else
    info "heartbeats while paused: $before -> $during"
fi
t=$(now_us)
"${VIRSH[@]}" resume "$DOM" >/dev/null
st=$(domstate)
if [ "$st" = running ]; then
    pass "resume -> state '$st' ($(( ($(now_us) - t) / 1000 )) ms)"
else
    fail "resume -> state '$st'"
fi
new_heartbeat() { [ "$(alive_count)" -gt "$during" ]; }
if wait_for 30 "heartbeat after resume" new_heartbeat; then
    pass "guest alive after resume (heartbeat after $(secs "$t") s)"
else
    fail "no heartbeat after resume"
fi
ip2=$(lease_ip)
if [ "$ip2" = "$IP" ]; then
    pass "lease still $ip2 after resume"
else
    fail "lease after resume: '$ip2'"
fi

# --- 9. live vCPUs / memory -----------------------------------------------------
t=$(now_us)
if out=$("${VIRSH[@]}" setvcpus "$DOM" 2 --live 2>&1); then
    cnt=$("${VIRSH[@]}" vcpucount "$DOM" --live --active 2>/dev/null || true)
    cpu_online() { grep -q 'cpus=2' <(tail -n 3 "$SERIAL"); }
    if wait_for 30 "guest to see 2 CPUs" cpu_online; then
        pass "setvcpus 2 --live: libvirt live count $cnt, guest online cpus=2 after $(secs "$t") s"
    else
        info "setvcpus 2 --live: libvirt live count $cnt, guest does not report 2 CPUs"
    fi
    t=$(now_us)
    if out2=$("${VIRSH[@]}" setvcpus "$DOM" 1 --live 2>&1); then
        info "setvcpus 1 --live (unplug) ok in $(secs "$t") s: live count $("${VIRSH[@]}" vcpucount "$DOM" --live --active 2>/dev/null || true)"
    else
        # Under TCG the guest often acks the ACPI eject after libvirt's 5 s
        # unplug timeout: the call errors, the unplug still completes.
        info "setvcpus 1 --live (unplug) returned an error after $(secs "$t") s: $(tr '\n' ' ' <<<"$out2")"
        one_vcpu() { [ "$("${VIRSH[@]}" vcpucount "$DOM" --live --active 2>/dev/null || true)" = 1 ]; }
        if wait_for 10 "live vcpu count 1" one_vcpu; then
            info "... but the unplug completed: live vcpu count 1 after $(secs "$t") s"
        else
            info "... and the live vcpu count is still $("${VIRSH[@]}" vcpucount "$DOM" --live --active 2>/dev/null || true) after $(secs "$t") s"
        fi
    fi
else
    info "setvcpus 2 --live failed: $out"
fi

balloon_current() {
    local s
    s=$("${VIRSH[@]}" domstats --balloon "$DOM" 2>/dev/null || true)
    awk -F= '/balloon.current=/ { print $2 }' <<<"$s"
}
for target in 200 112; do
    t=$(now_us)
    if out=$("${VIRSH[@]}" setmem "$DOM" "${target}M" --live 2>&1); then
        want=$((target * 1024))
        reached() { [ "$(balloon_current)" = "$want" ]; }
        if wait_for 30 "balloon.current=$want" reached; then
            pass "setmem ${target}M --live: balloon.current=$want after $(secs "$t") s"
        else
            fail "setmem ${target}M --live: balloon.current=$(balloon_current), wanted $want"
        fi
    else
        fail "setmem ${target}M --live failed: $out"
    fi
done
sleep 6
info "guest view: $(grep '^RAPID-GUEST-ALIVE' "$SERIAL" | tail -n 1 | tr -d '\r')"
if out=$("${VIRSH[@]}" setmem "$DOM" 300M --live 2>&1); then
    fail "setmem above <memory> unexpectedly accepted"
else
    pass "setmem above <memory> (300M > 256M) refused: $(tr '\n' ' ' <<<"$out" | cut -c1-100)"
fi

# --- 10. libvirtd killed and restarted under the running guest -----------------
LPID=$(tr -dc '0-9' </run/libvirtd.pid 2>/dev/null || true)
if [ -n "$LPID" ] && [ "$(cat "/proc/$LPID/comm" 2>/dev/null || true)" = libvirtd ]; then
    t=$(now_us)
    kill -KILL "$LPID"
    gone() { ! kill -0 "$LPID" 2>/dev/null; }
    wait_for 10 "libvirtd to die" gone
    if kill -0 "$QPID" 2>/dev/null; then
        pass "qemu (pid $QPID) survives SIGKILL of libvirtd"
    else
        fail "qemu died with libvirtd"
    fi
    t=$(now_us)
    "$HERE/setup-host.sh" 2>/dev/null
    timing "libvirtd restart -> virsh answers: $(secs "$t") s"
    st=$(domstate)
    if [ "$st" = running ]; then
        pass "after libvirtd restart: $DOM '$st'"
    else
        fail "after libvirtd restart: $DOM '$st'"
    fi
    ip3=$(lease_ip)
    if [ "$ip3" = "$IP" ]; then
        pass "after libvirtd restart: lease $ip3"
    else
        fail "after libvirtd restart: lease '$ip3'"
    fi
    c=$(alive_count)
    hb() { [ "$(alive_count)" -gt "$c" ]; }
    if wait_for 30 "heartbeat after libvirtd restart" hb; then
        pass "guest heartbeat continues"
    else
        fail "no heartbeat after libvirtd restart"
    fi
    info "after libvirtd restart: live vcpu count $("${VIRSH[@]}" vcpucount "$DOM" --live --active 2>/dev/null || true) (libvirt re-reads vCPUs on reconnect)"
    if "${VIRSH[@]}" domstats --cpu-total "$DOM" >/dev/null 2>&1 && "${VIRSH[@]}" suspend "$DOM" >/dev/null && "${VIRSH[@]}" resume "$DOM" >/dev/null; then
        pass "after libvirtd restart: domstats, suspend, resume work"
    else
        fail "after libvirtd restart: control of the domain lost"
    fi
else
    info "libvirtd pid file missing: restart test skipped"
fi

# --- 11. shutdown, destroy, undefine, overlay, network -------------------------
t=$(now_us)
"${VIRSH[@]}" shutdown "$DOM" >/dev/null
off() { [ "$(domstate)" = "shut off" ]; }
if wait_for 30 "ACPI shutdown" off; then
    pass "ACPI shutdown (virsh shutdown) -> shut off in $(secs "$t") s"
else
    info "ACPI shutdown did not complete in 30 s"
fi
if [ "$(domstate)" != "shut off" ]; then
    "${VIRSH[@]}" destroy "$DOM" >/dev/null
fi
# destroy is exercised on a running guest too: start it again, destroy it
t=$(now_us)
"${VIRSH[@]}" start "$DOM" >/dev/null
"${VIRSH[@]}" destroy "$DOM" >/dev/null
if [ "$(domstate)" = "shut off" ]; then
    pass "restart + destroy -> shut off ($(secs "$t") s)"
else
    fail "destroy"
fi
"${VIRSH[@]}" undefine "$DOM" >/dev/null
if timeout 10 virsh -c "$URI" dominfo "$DOM" >/dev/null 2>&1; then
    fail "domain still defined after undefine"
else
    pass "undefined $DOM"
fi
rm -f -- "$OVERLAY"
if [ ! -e "$OVERLAY" ]; then
    pass "overlay deleted"
else
    fail "overlay still there"
fi
if [ -O "$RAPID_GUEST_TEMPLATE" ]; then
    pass "template still owned by $(stat -c %U "$RAPID_GUEST_TEMPLATE") after the run (libvirt restored ownership)"
else
    info "template now owned by $(stat -c %U:%G "$RAPID_GUEST_TEMPLATE"): libvirt's DAC driver chowns backing files and does not restore them"
fi
"$HERE/network.sh" down
NET_UP=0
left=$("${VIRSH[@]}" net-list --all --name 2>/dev/null || true)
if grep -qx "$NET" <<<"$left"; then
    fail "network $NET still defined"
else
    pass "network $NET removed"
fi

# --- summary -------------------------------------------------------------------
echo
echo "==== smoke summary ($(secs "$T0") s total) ===="
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then
    echo "SMOKE: FAILED"
    exit 1
fi
echo "SMOKE: OK"
