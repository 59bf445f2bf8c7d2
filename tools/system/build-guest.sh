#!/bin/bash
# build-guest.sh OUTDIR -- build a tiny real guest for rapid-vmm system tests.
#
# Produces, in OUTDIR:
#   vmlinuz         Debian's stock kernel (linux-image-amd64's target package)
#   initramfs.img   busybox (static) initramfs whose /init loads the virtio
#                   modules, takes a DHCP lease and prints
#                   "RAPID-GUEST-READY <ip>" on the serial console
#   template.qcow2  small blank qcow2 template disk (overlays are made of it)
#   guest.env       KEY="VALUE" lines: paths, kernel cmdline, marker, min RAM
#   .inputs         what the guest was built from (cache key)
#
# Idempotent and cached: when OUTDIR already holds a complete guest built from
# the same inputs (kernel package version, busybox version, this script) it
# does nothing.  Concurrent runs on one OUTDIR are serialised with flock.
#
# OUTDIR must be reachable by the user QEMU runs as (libvirt-qemu on Debian):
# every directory on the path needs o+x; the script makes OUTDIR 0755 and the
# files 0644.  Do not use a `mktemp -d` directory (0700) without chmod 0755.
#
# Needs: apt-get (with up-to-date lists), dpkg-deb, kmod (depmod/modprobe),
# busybox-static, cpio, gzip, qemu-img, flock.  setup-host.sh installs them.
#
# Env overrides:
#   RAPID_GUEST_KERNEL_PKG   kernel package to use (default: the package that
#                            linux-image-amd64's candidate depends on)
#   RAPID_GUEST_KERNEL_DEB   path to an already downloaded kernel .deb
#   RAPID_GUEST_TEMPLATE_MB  template disk size in MiB (default 64)
#   RAPID_GUEST_HEARTBEAT    seconds between RAPID-GUEST-ALIVE lines (default 5,
#                            0 = none); written into the cmdline in guest.env
set -euo pipefail

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

die() { echo "build-guest: ERROR: $*" >&2; exit 1; }
log() { echo "build-guest: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
OUTDIR_ARG=$1
mkdir -p -- "$OUTDIR_ARG"
OUTDIR=$(cd -- "$OUTDIR_ARG" && pwd -P)

SCRIPT_PATH=$(readlink -f -- "${BASH_SOURCE[0]}")
TEMPLATE_MB=${RAPID_GUEST_TEMPLATE_MB:-64}
HEARTBEAT=${RAPID_GUEST_HEARTBEAT:-5}
[[ $TEMPLATE_MB =~ ^[0-9]+$ ]] || die "RAPID_GUEST_TEMPLATE_MB must be an integer"
[[ $HEARTBEAT =~ ^[0-9]+$ ]] || die "RAPID_GUEST_HEARTBEAT must be an integer"

# Modules the guest wants (loaded with their dependencies, in order; those
# built into the kernel are skipped).  virtio_pci is the transport; it is not
# a dependency of the device drivers, so it is listed explicitly.
WANTED_MODULES=(virtio_pci virtio_blk virtio_net virtio_balloon virtio_rng button evdev)

for tool in apt-get apt-cache dpkg-deb dpkg-query depmod modprobe busybox cpio gzip qemu-img flock sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "missing tool '$tool' (run tools/system/setup-host.sh)"
done
BUSYBOX=$(command -v busybox)
# The guest needs a static busybox (Debian's busybox-static ships /bin/busybox).
if [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null || true)" != "install ok installed" ]; then
    die "busybox-static is not installed (run tools/system/setup-host.sh)"
fi
BUSYBOX_VERSION=$(dpkg-query -W -f='${Version}' busybox-static)

exec 9>"$OUTDIR/.lock"
flock -w 900 9 || die "timed out waiting for the lock on $OUTDIR/.lock"

# --- which kernel -----------------------------------------------------------
if [ -n "${RAPID_GUEST_KERNEL_DEB:-}" ]; then
    [ -f "$RAPID_GUEST_KERNEL_DEB" ] || die "RAPID_GUEST_KERNEL_DEB=$RAPID_GUEST_KERNEL_DEB: no such file"
    KPKG=$(dpkg-deb -f "$RAPID_GUEST_KERNEL_DEB" Package)
    KVER_PKG=$(dpkg-deb -f "$RAPID_GUEST_KERNEL_DEB" Version)
else
    if [ -n "${RAPID_GUEST_KERNEL_PKG:-}" ]; then
        KPKG=$RAPID_GUEST_KERNEL_PKG
    else
        KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null \
            | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ && !found { print $2; found = 1 }')
        [ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 (run 'apt-get update' / setup-host.sh)"
    fi
    KVER_PKG=$(apt-cache policy "$KPKG" 2>/dev/null | awk '$1 == "Candidate:" && !found { print $2; found = 1 }')
    if [ -z "$KVER_PKG" ] || [ "$KVER_PKG" = "(none)" ]; then
        die "no candidate version for $KPKG (run 'apt-get update')"
    fi
fi

INPUTS="kernel_pkg=$KPKG
kernel_pkg_version=$KVER_PKG
busybox_static=$BUSYBOX_VERSION
template_mb=$TEMPLATE_MB
heartbeat=$HEARTBEAT
script_sha256=$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)"

complete() {
    local f
    for f in vmlinuz initramfs.img template.qcow2 guest.env .inputs; do
        [ -s "$OUTDIR/$f" ] || return 1
    done
    [ "$(cat "$OUTDIR/.inputs")" = "$INPUTS" ]
}

if complete; then
    log "cached: $OUTDIR already holds a guest built from $KPKG $KVER_PKG (nothing to do)"
    exit 0
fi

log "building guest in $OUTDIR from $KPKG $KVER_PKG, busybox-static $BUSYBOX_VERSION"
START=$(date +%s)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/rapid-guest-build.XXXXXX")
cleanup() { rm -rf -- "$WORK"; }
trap cleanup EXIT

# --- kernel package -----------------------------------------------------------
if [ -n "${RAPID_GUEST_KERNEL_DEB:-}" ]; then
    DEB=$RAPID_GUEST_KERNEL_DEB
else
    mkdir -p "$WORK/dl"
    # apt-get download writes to the current directory; _apt cannot write to
    # a root-only mktemp dir, so it warns and downloads as root: harmless.
    (cd "$WORK/dl" && apt-get download -q "$KPKG=$KVER_PKG" 2>&1 | grep -v 'Download is performed unsandboxed' >&2) || true
    DEB=$(find "$WORK/dl" -maxdepth 1 -name '*.deb' -print -quit)
    [ -n "$DEB" ] || die "apt-get download $KPKG=$KVER_PKG failed"
fi
mkdir -p "$WORK/kernel"
dpkg-deb -x "$DEB" "$WORK/kernel"
VMLINUZ=$(find "$WORK/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
[ -n "$VMLINUZ" ] || die "no vmlinuz in $DEB"
KREL=${VMLINUZ##*/vmlinuz-}
MODROOT=$WORK/kernel/lib/modules/$KREL
[ -d "$MODROOT" ] || die "no modules for $KREL in $DEB"
# The .deb ships no modules.dep (its postinst runs depmod): make one.
depmod -b "$WORK/kernel" "$KREL"

# --- initramfs tree ----------------------------------------------------------
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,usr/bin,usr/sbin,lib/modules}
cp "$BUSYBOX" "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"

: >"$WORK/modules.order"
for m in "${WANTED_MODULES[@]}"; do
    if ! out=$(modprobe -d "$WORK/kernel" -S "$KREL" --show-depends "$m" 2>&1); then
        die "module $m not found for $KREL: $out"
    fi
    while read -r kind path _; do
        case $kind in
            insmod)
                rel=${path#"$MODROOT"/}
                case $rel in
                    *.ko) ;;
                    *) die "compressed module $rel not supported by busybox insmod here" ;;
                esac
                if ! grep -qxF "$rel" "$WORK/modules.order"; then
                    mkdir -p "$ROOT/lib/modules/$(dirname "$rel")"
                    cp "$path" "$ROOT/lib/modules/$rel"
                    echo "$rel" >>"$WORK/modules.order"
                fi
                ;;
            builtin) ;;
            *) die "unexpected modprobe output for $m: $kind $path" ;;
        esac
    done <<<"$out"
done
cp "$WORK/modules.order" "$ROOT/etc/modules.order"
log "modules (insmod order): $(sed 's#.*/##' "$WORK/modules.order" | tr '\n' ' ')"

cat >"$ROOT/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc event script: configure the interface, remember the address.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface" 2>/dev/null
        ip link set "$interface" up
        ;;
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
        if [ -n "$router" ]; then
            ip route del default 2>/dev/null
            for r in $router; do ip route add default via "$r" dev "$interface" && break; done
        fi
        : >/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        old=$(cat /run/rapid-ip 2>/dev/null)
        echo "$ip" >/run/rapid-ip
        [ "$old" = "$ip" ] || echo "RAPID-GUEST-LEASE $1 $interface $ip lease=${lease:-?}s up=$(cut -d' ' -f1 /proc/uptime)" >/dev/console
        ;;
    leasefail|nak)
        echo "RAPID-GUEST-DHCP $1 on $interface" >/dev/console
        ;;
esac
exit 0
EOF

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# rapid-vmm test guest /init (busybox).  Never exits.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
echo "RAPID-GUEST-BOOT kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"

HB=5
AS=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        rapid.hb=*) HB=${arg#rapid.hb=} ;;
        rapid.as=*) AS=${arg#rapid.as=} ;;
    esac
done

# The guest's Acceleration Server stand-in (rapid.as= on the cmdline):
#   legacy:HOST:PORT  registers as the original AS does: AS_RM_REGISTER_VMM
#                     (38, our IP) to the VMM's legacy port, reads OK + user
#                     id, sends its status byte OK;
#   rpc               prints "RAPID-GUEST-AS rpc ready <ip>" for the test,
#                     which registers it over RPC (no AMQP client here).
as_legacy() {
    host=$1 port=$2 ip=$3
    n=$(( ${#ip} + 3 ))
    frame="\254\355\000\005\167\\$(printf %03o "$n")\046\000\\$(printf %03o "${#ip}")"
    try=1
    while [ $try -le 5 ]; do
        # Java object stream: header, one block (command, UTF IP), then the
        # status block; nc half-closes and prints the reply until the VMM
        # closes.
        reply=$(printf "$frame%s\167\001\001" "$ip" \
            | timeout 60 nc -w 10 "$host" "$port" | od -An -tu1 | tr -s ' \n' '  ')
        set -- $reply
        if [ "$#" -ge 15 ] && [ "$5" = 119 ] && [ "$7" = 1 ]; then
            shift 7
            user=0
            for b in "$@"; do
                user=$(( user * 256 + b ))
            done
            echo "RAPID-GUEST-AS legacy registered user $user with $host:$port"
            return 0
        fi
        echo "RAPID-GUEST-AS legacy attempt $try failed: [$reply]"
        try=$((try + 1))
        sleep 2
    done
    return 1
}

as_start() {
    ip=$(cat /run/rapid-ip)
    case "$AS" in
        legacy:*:*)
            rest=${AS#legacy:}
            as_legacy "${rest%:*}" "${rest##*:}" "$ip"
            ;;
        rpc) echo "RAPID-GUEST-AS rpc ready $ip" ;;
        *) echo "RAPID-GUEST-AS unknown mode '$AS'" ;;
    esac
}

while read -r mod; do
    insmod "/lib/modules/$mod" 2>/dev/null || echo "RAPID-GUEST-WARN insmod $mod failed"
done </etc/modules.order
hostname rapid-guest
ip link set lo up

# first ethernet interface (bounded wait for the driver to bind)
IF=
i=0
while [ $i -lt 100 ]; do
    for d in /sys/class/net/*; do
        n=${d##*/}
        [ "$n" = lo ] && continue
        [ -e "$d/device" ] || continue
        IF=$n
        break
    done
    [ -n "$IF" ] && break
    i=$((i + 1))
    usleep 100000
done

disks=
for b in /sys/block/vd*; do
    [ -e "$b" ] || continue
    disks="$disks ${b##*/}:$(( $(cat "$b/size") / 2048 ))MiB"
done
echo "RAPID-GUEST-DEVICES net=${IF:-none} disks=${disks# } mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo) up=$(cut -d' ' -f1 /proc/uptime)"

# ACPI power button -> clean power off, so `virsh shutdown` works.
for ev in /sys/class/input/input*; do
    [ -e "$ev/name" ] || continue
    grep -q 'Power Button' "$ev/name" || continue
    for e in "$ev"/event*; do
        [ -e "$e" ] || continue
        dev=/dev/input/${e##*/}
        (
            dd if="$dev" of=/dev/null bs=24 count=1 2>/dev/null
            echo "RAPID-GUEST-POWEROFF"
            sync
            poweroff -f
        ) &
    done
done

if [ -n "$IF" ]; then
    ip link set "$IF" up
    # stays in the foreground of its own background job: renews the lease
    udhcpc -f -i "$IF" -s /etc/udhcpc.script -t 0 -T 1 -A 2 >/tmp/udhcpc.log 2>&1 &
    i=0
    while [ ! -s /run/rapid-ip ] && [ $i -lt 1200 ]; do
        usleep 100000
        i=$((i + 1))
    done
fi
if [ -s /run/rapid-ip ]; then
    echo "RAPID-GUEST-READY $(cat /run/rapid-ip)"
    echo "RAPID-GUEST-UPTIME $(cut -d' ' -f1 /proc/uptime)"
    [ -n "$AS" ] && as_start &
else
    echo "RAPID-GUEST-NOLEASE ${IF:-no-interface}"
fi

# Keep running; bring hot-plugged vCPUs online; print a heartbeat.
n=0
while :; do
    for c in /sys/devices/system/cpu/cpu[0-9]*; do
        if [ -e "$c/online" ] && [ "$(cat "$c/online")" = 0 ]; then
            echo 1 >"$c/online" 2>/dev/null && echo "RAPID-GUEST-CPU-ONLINE ${c##*/}"
        fi
    done
    if [ "$HB" -gt 0 ] 2>/dev/null; then
        sleep "$HB"
        n=$((n + 1))
        echo "RAPID-GUEST-ALIVE $n ip=$(cat /run/rapid-ip 2>/dev/null) cpus=$(grep -c ^processor /proc/cpuinfo) mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
    else
        sleep 5
    fi
done
EOF
chmod 0755 "$ROOT/init" "$ROOT/etc/udhcpc.script"
: >"$ROOT/etc/resolv.conf"

(cd "$ROOT" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) | gzip -9 -n >"$WORK/initramfs.img"

# --- template disk ----------------------------------------------------------
qemu-img create -q -f qcow2 "$WORK/template.qcow2" "${TEMPLATE_MB}M"

CMDLINE="console=ttyS0 quiet rapid.hb=$HEARTBEAT"
cat >"$WORK/guest.env" <<EOF
# rapid-vmm system-test guest, built by tools/system/build-guest.sh
# KEY="VALUE" lines; values contain no quotes, dollars or backslashes.
RAPID_GUEST_KERNEL="$OUTDIR/vmlinuz"
RAPID_GUEST_INITRD="$OUTDIR/initramfs.img"
RAPID_GUEST_TEMPLATE="$OUTDIR/template.qcow2"
RAPID_GUEST_CMDLINE="$CMDLINE"
RAPID_GUEST_KERNEL_RELEASE="$KREL"
RAPID_GUEST_KERNEL_PKG="$KPKG=$KVER_PKG"
RAPID_GUEST_DOMAIN_TYPE="qemu"
RAPID_GUEST_MIN_MEMORY_MIB="96"
RAPID_GUEST_READY_MARKER="RAPID-GUEST-READY"
RAPID_GUEST_MODULES="$(sed 's#.*/##; s#\.ko$##' "$WORK/modules.order" | tr '\n' ' ' | sed 's/ $//')"
EOF

# --- install atomically (per file), then the cache key last -----------------
chmod 0755 "$OUTDIR"
rm -f "$OUTDIR/.inputs"
install -m 0644 "$VMLINUZ" "$OUTDIR/vmlinuz.new"
install -m 0644 "$WORK/initramfs.img" "$OUTDIR/initramfs.img.new"
install -m 0644 "$WORK/template.qcow2" "$OUTDIR/template.qcow2.new"
install -m 0644 "$WORK/guest.env" "$OUTDIR/guest.env.new"
for f in vmlinuz initramfs.img template.qcow2 guest.env; do
    mv -f "$OUTDIR/$f.new" "$OUTDIR/$f"
done
printf '%s\n' "$INPUTS" >"$OUTDIR/.inputs.new"
mv -f "$OUTDIR/.inputs.new" "$OUTDIR/.inputs"

# Can the user QEMU runs as read the files?  (qemu.conf 'user', Debian's
# default libvirt-qemu; dynamic_ownership chowns the files themselves at
# domain start, but every directory on the path must be searchable.)
QEMU_USER=$(sed -n 's/^[[:space:]]*user[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' /etc/libvirt/qemu.conf 2>/dev/null | tail -n 1 || true)
QEMU_USER=${QEMU_USER:-libvirt-qemu}
case $QEMU_USER in
    root|+0|0) ;;
    *)
        if id -u "${QEMU_USER#+}" >/dev/null 2>&1 && command -v runuser >/dev/null 2>&1; then
            for f in vmlinuz initramfs.img template.qcow2; do
                runuser -u "${QEMU_USER#+}" -- test -r "$OUTDIR/$f" \
                    || log "WARNING: user $QEMU_USER (QEMU) cannot read $OUTDIR/$f: make every directory on the path o+x"
            done
        fi
        ;;
esac

log "done in $(( $(date +%s) - START )) s: $(du -h "$OUTDIR/vmlinuz" | cut -f1) kernel $KREL, $(du -h "$OUTDIR/initramfs.img" | cut -f1) initramfs, ${TEMPLATE_MB} MiB template"
