#!/bin/bash
#
# dry-run.sh - run the rapid-vmm devstack plugin without devstack.
#
#   dry-run.sh <repo> <scenario> <workdir>
#
# <repo> holds the plugin (devstack/settings, devstack/plugin.sh) and
# etc/rapid-vmm/; <workdir> (created, must not exist) receives:
#
#   sandbox/      the only place the plugin may write: DEST, DATA_DIR, FILES,
#                 the configuration directory, TMPDIR
#   calls.log     every devstack function and command the plugin called
#   env/<proc>    the RAPID_VMM_* and devstack variables at the end of each
#                 process
#   artifacts/    the configuration file as it was after each stack.sh
#   output.log    what the plugin printed (xtrace included)
#   FAILED        present when a check of the harness failed
#
# Like devstack, stack.sh, unstack.sh and clean.sh are separate processes
# that each source devstack/settings, then devstack/plugin.sh once per
# phase. An enabled scenario runs stack, unstack, stack again (a second
# stack.sh on the same cloud), unstack and clean; "disabled" runs stack,
# unstack and clean. The plugin runs with errexit (as in stack.sh) and
# nounset (stricter than devstack: an unset variable is a bug).
#
# Scenarios: libvirt (no Nova), nova (n-api enabled, admin credentials),
# nova-service (a service user, TLS proxy on), disabled (rapid-vmm
# disabled in local.conf).

# Variables set here are read by the sourced plugin:
# shellcheck disable=SC2034

set -o errexit -o nounset -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Tools the plugin may run by name: they only read (no awk, sort -o, date
# -s, hostname NAME...). Anything else it runs must be a function of
# fake-devstack.sh.
SHIM_TOOLS="basename cat cut dirname grep head id readlink realpath tail tr
true false uname wc whoami"

SCENARIOS="libvirt nova nova-service disabled"

function usage {
    echo "usage: $0 <repo> <scenario> <workdir>   (scenarios: $SCENARIOS)" >&2
    exit 2
}

# devstack_globals - what stackrc, lib/* and stack.sh set before plugins
# run (values of a typical single-node devstack; paths in the sandbox)
function devstack_globals {
    TOP_DIR=$FD_SANDBOX/devstack
    DEST=$FD_SANDBOX/opt/stack
    DATA_DIR=$DEST/data
    FILES=$TOP_DIR/files
    STACK_USER=stack
    HOST_IP=192.0.2.10
    SERVICE_HOST=$HOST_IP
    RABBIT_USERID=stackrabbit
    RABBIT_PASSWORD="rabbit-secret"
    RABBIT_HOST=$SERVICE_HOST
    KEYSTONE_SERVICE_URI=http://$SERVICE_HOST/identity
    SERVICE_PROJECT_NAME=service
    SERVICE_DOMAIN_NAME=Default
    REGION_NAME=RegionOne
    ENABLE_DEBUG_LOG_LEVEL=True
    LOG_COLOR=False
    DEFAULT_IMAGE_NAME=cirros-0.6.3-x86_64-disk
    PRIVATE_NETWORK_NAME=private
    CIRROS_VERSION=0.6.3
    CIRROS_ARCH=x86_64
    SSL_BUNDLE_FILE=$DATA_DIR/ca-bundle.pem
    OS_CLOUD=devstack-admin
    # devstack's Python (inc/python; the global virtualenv's python3): a
    # function of fake-devstack.sh here, which runs the Python under test
    PYTHON=python3
    DISABLED_SERVICES=""
    # The plugin's checkout is the repository under test (read only);
    # /etc/rapid-vmm is outside the sandbox, so local.conf moves it.
    RAPID_VMM_DIR=$FD_REPO
    RAPID_VMM_CONF_DIR=$FD_SANDBOX/etc/rapid-vmm
}

# devstack_passwords - stack.sh asks for these after the plugin settings
# were sourced: the settings must not read them
function devstack_passwords {
    ADMIN_PASSWORD="admin-secret"
    SERVICE_PASSWORD="service-secret"
}

function scenario_libvirt {
    ENABLED_SERVICES=rabbit,mysql,key
    FD_EXPECT_DRIVER=libvirt
    FD_FAKE_DOMAINS="rapid-vm-42-1a2b rapid-helper-1-3c4d someone-else"
}

function scenario_nova {
    ENABLED_SERVICES=rabbit,mysql,key,g-api,placement-api,n-api,n-cond
    ENABLED_SERVICES+=,n-sch,n-cpu,q-svc
    FD_EXPECT_DRIVER=nova
}

function scenario_nova-service {
    scenario_nova
    ENABLED_SERVICES+=,tls-proxy
    RAPID_VMM_NOVA_AUTH=service
}

function scenario_disabled {
    ENABLED_SERVICES=rabbit,mysql,key,n-api,n-cpu
    # as `disable_service rapid-vmm` in local.conf does
    DISABLED_SERVICES=rapid-vmm
    FD_EXPECT_DRIVER=none
}

# dump_env <file> - the variables verify.py needs, name \x1f value \x1e
function dump_env {
    local name
    {
        for name in $(compgen -v | grep -E '^(RAPID_VMM_|FD_)') \
                ENABLED_SERVICES DISABLED_SERVICES DEST DATA_DIR FILES \
                HOST_IP RABBIT_USERID RABBIT_PASSWORD RABBIT_HOST \
                KEYSTONE_SERVICE_URI ADMIN_PASSWORD SERVICE_PASSWORD \
                SERVICE_PROJECT_NAME SERVICE_DOMAIN_NAME REGION_NAME \
                DEFAULT_IMAGE_NAME PRIVATE_NETWORK_NAME SSL_BUNDLE_FILE \
                HOSTNAME STACK_USER; do
            if [[ "$(declare -p "$name" 2>/dev/null)" == "declare -"[aA]* ]]; then
                continue
            fi
            printf '%s\x1f%s\x1e\n' "$name" "${!name-}"
        done
    } >"$1"
}

# on_error <status> <command> <file> <line> - keep the first failure, with
# the text of the line that failed
function on_error {
    if [[ -f "$FD_WORK/ERROR" ]]; then
        return 0
    fi
    local text=$2
    if [[ -f "$3" ]]; then
        text=$(_fd_real sed -n "${4}{s/^[[:space:]]*//;p}" "$3")
    fi
    printf 'in %s: %s:%s: %s (status %s)\n' "$FD_PHASE" "${3#"$FD_REPO"/}" \
        "$4" "$text" "$1" >"$FD_WORK/ERROR"
}

# run_process_mode <stack|unstack|clean> - one devstack script: this runs in
# a child process
function run_process_mode {
    local mode=$1
    cd "$FD_SANDBOX/devstack"
    # shellcheck source=tools/devstack-check/fake-devstack.sh
    source "$HERE/fake-devstack.sh"
    FD_FAKE_DOMAINS=""
    devstack_globals
    "scenario_$FD_SCENARIO"
    TMPDIR=$FD_SANDBOX/tmp
    export TMPDIR

    local plugin=$FD_REPO/devstack/plugin.sh
    # the first command that fails (and stops the process under errexit)
    set -o errtrace
    trap 'on_error "$?" "$BASH_COMMAND" "${BASH_SOURCE[0]:-?}" "$LINENO"' ERR
    PATH=$FD_SHIM_DIR
    set +o pipefail

    FD_PHASE=source
    # shellcheck disable=SC1091
    source "$FD_REPO/devstack/settings"
    devstack_passwords

    case "$mode" in
        stack)
            local phase
            for phase in pre-install install post-config extra test-config; do
                FD_PHASE=stack:$phase
                # shellcheck disable=SC1090
                source "$plugin" stack "$phase"
            done
            FD_PHASE=harness
            if [[ -f "${RAPID_VMM_CONF:-/nonexistent}" ]]; then
                _fd_real cp "$RAPID_VMM_CONF" \
                    "$FD_WORK/artifacts/rapid-vmm.conf.$FD_PROCESS"
            fi
            ;;
        unstack|clean)
            FD_PHASE=$mode
            # shellcheck disable=SC1090
            source "$plugin" "$mode"
            ;;
    esac
    FD_PHASE=harness
    dump_env "$FD_WORK/env/$FD_PROCESS"
}

if [[ "${1:-}" == "--process" ]]; then
    set -o errexit -o nounset
    run_process_mode "$2"
    exit 0
fi

[[ $# -eq 3 ]] || usage
FD_REPO=$(cd "$1" && pwd)
FD_SCENARIO=$2
[[ " $SCENARIOS " == *" $FD_SCENARIO "* ]] || usage
if [[ -e "$3" ]]; then
    echo "$0: $3 exists already" >&2
    exit 2
fi
mkdir -p "$3"
FD_WORK=$(cd "$3" && pwd -P)
FD_SANDBOX=$FD_WORK/sandbox
FD_LOG=$FD_WORK/calls.log
FD_FAILED=$FD_WORK/FAILED
FD_STATE=$FD_WORK/state
FD_SHIM_DIR=$FD_WORK/shim
FD_REAL_PATH=$PATH
FD_PYTHON=${FD_PYTHON:-python3}
FD_BIN_DIR=$(cd "$(dirname "$FD_PYTHON")" && pwd)
mkdir -p "$FD_SANDBOX/devstack/files" "$FD_SANDBOX/tmp" "$FD_STATE" \
    "$FD_SHIM_DIR" "$FD_WORK/artifacts" "$FD_WORK/env"
: >"$FD_LOG"
for tool in $SHIM_TOOLS; do
    ln -s "$(command -v "$tool")" "$FD_SHIM_DIR/$tool"
done
export FD_REPO FD_SCENARIO FD_WORK FD_SANDBOX FD_LOG FD_FAILED FD_STATE \
    FD_SHIM_DIR FD_REAL_PATH FD_BIN_DIR FD_PYTHON

if [[ "$FD_SCENARIO" == "disabled" ]]; then
    processes="stack1 unstack1 clean"
else
    processes="stack1 unstack1 stack2 unstack2 clean"
fi
printf 'scenario %s: %s\n' "$FD_SCENARIO" "$processes" >"$FD_WORK/output.log"
for FD_PROCESS in $processes; do
    export FD_PROCESS
    printf '\n==== %s ====\n' "$FD_PROCESS" >>"$FD_WORK/output.log"
    status=0
    env -u FD_PHASE bash "$HERE/dry-run.sh" --process "${FD_PROCESS%[0-9]}" \
        >>"$FD_WORK/output.log" 2>&1 || status=$?
    if [[ -f "$FD_FAILED" ]]; then
        cat "$FD_FAILED" >&2
        exit 1
    fi
    if [[ $status -ne 0 ]]; then
        echo "DRY RUN FAILED [$FD_PROCESS]: exit status $status; the end" \
            "of $FD_WORK/output.log:" >&2
        tail -n 15 "$FD_WORK/output.log" >&2
        if [[ -f "$FD_WORK/ERROR" ]]; then
            echo "DRY RUN FAILED [$FD_PROCESS] $(cat "$FD_WORK/ERROR")" >&2
        fi
        echo "DRY RUN FAILED [$FD_PROCESS]: exit status $status" >"$FD_FAILED"
        exit 1
    fi
done
echo "dry run $FD_SCENARIO: $(grep -c $'\x1e' "$FD_LOG") calls recorded in $FD_LOG"
