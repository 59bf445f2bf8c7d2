#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine for rapid-vmm: system packages, a
# virtualenv with rapid-vmm installed (pinned by upper-constraints.txt) and
# a running RabbitMQ. Idempotent: a second run only checks.
#
# Environment:
#   RAPID_VMM_VENV    virtualenv to create/use (default: <repo>/.venv)
#   RAPID_VMM_PYTHON  interpreter for the virtualenv (default: python3)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${RAPID_VMM_VENV:-$REPO/.venv}
PYTHON=${RAPID_VMM_PYTHON:-python3}
# systemd and logrotate: the packaging tests check etc/ with their tools
# (offline; no running systemd needed); rabbitmq-server: the shared broker
# and the private broker nodes of the functional tests.
APT_PACKAGES=(libvirt-dev pkg-config qemu-utils gcc python3-dev shellcheck
    systemd logrotate rabbitmq-server)

log() { printf '[setup-env] %s\n' "$*"; }

missing_packages() {
    local pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null \
                | grep -q 'install ok installed'; then
            printf '%s\n' "$pkg"
        fi
    done
}

apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    log "installing $*"
    "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" \
        apt-get -o DPkg::Lock::Timeout=600 install -y -q "$@" >/dev/null
}

mapfile -t needed < <(missing_packages "${APT_PACKAGES[@]}")
if [ "${#needed[@]}" -gt 0 ]; then
    apt_install "${needed[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating the virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.rapid-vmm-installed"
inputs=$(cat "$REPO/requirements.txt" "$REPO/test-requirements.txt" \
    "$REPO/upper-constraints.txt" "$REPO/setup.cfg" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs" ]; then
    log "installing rapid-vmm and its requirements into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip wheel
    "$VENV/bin/pip" install -q -c "$REPO/upper-constraints.txt" \
        -r "$REPO/requirements.txt" -r "$REPO/test-requirements.txt" \
        tox tox-uv
    "$VENV/bin/pip" install -q -c "$REPO/upper-constraints.txt" \
        --no-build-isolation -e "$REPO"
    printf '%s\n' "$inputs" >"$stamp"
fi

broker_up() {
    "$VENV/bin/python" - <<'PY'
import socket
import sys
try:
    socket.create_connection(('127.0.0.1', 5672), timeout=2).close()
except OSError:
    sys.exit(1)
PY
}

if ! broker_up; then
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        apt_install rabbitmq-server
    fi
    log "starting RabbitMQ"
    if command -v rabbitmq-server >/dev/null 2>&1; then
        rabbitmq-server -detached >/dev/null 2>&1 || true
    fi
    for _ in $(seq 1 60); do
        if broker_up; then
            break
        fi
        sleep 1
    done
    if ! broker_up; then
        log "RabbitMQ did not start on 127.0.0.1:5672" >&2
        exit 1
    fi
fi
log "ready: $VENV (RabbitMQ on 127.0.0.1:5672)"
