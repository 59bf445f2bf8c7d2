#!/bin/bash
#
# run.sh - check the rapid-vmm devstack plugin without a devstack.
#
#   bash tools/devstack-check/run.sh [--repo DIR] [--keep] [STEP...]
#
# Steps (all of them, in this order, when none is named):
#   lint          bash -n, shellcheck (skipped with a warning when not
#                 installed) and bashate -i E006 on devstack/settings,
#                 devstack/plugin.sh, devstack/lib/* and this checker
#   static        static_check.py: every variable read is assigned, given a
#                 default or a devstack variable of its allow-list; settings
#                 keep local.conf values; no redirection writes a file
#   libvirt, nova, nova-service, disabled
#                 dry-run.sh runs the plugin for that scenario with fake
#                 devstack functions confined to a sandbox, then verify.py
#                 checks what it did (see both files)
#
# --repo DIR checks the plugin of another checkout (DIR/devstack, with
# DIR/etc/rapid-vmm); the default is this repository. --keep keeps the
# work directory (kept anyway on failure). The Python environment is
# $RAPID_VMM_CHECK_PYTHON, else .venv/bin/python of this repository, else
# python3; it must have rapid-vmm installed.
#
# Exit status 0 when every step passes; otherwise 1 at the first failure,
# with a line "devstack-check: FAIL (<step>): ..." on stderr.

set -o errexit -o nounset -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
REPO=$ROOT
KEEP=0
ALL_STEPS="lint static libvirt nova nova-service disabled"
steps=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --repo) REPO=$(cd "$2" && pwd); shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
        *)
            if [[ " $ALL_STEPS " != *" $1 "* ]]; then
                echo "run.sh: unknown step $1 (steps: $ALL_STEPS)" >&2
                exit 2
            fi
            steps+=("$1")
            ;;
    esac
    shift
done
if [[ ${#steps[@]} -eq 0 ]]; then
    read -r -a steps <<<"$ALL_STEPS"
fi

PYTHON=${RAPID_VMM_CHECK_PYTHON:-}
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then
        PYTHON=$ROOT/.venv/bin/python
    else
        PYTHON=$(command -v python3)
    fi
fi
BIN_DIR=$(cd "$(dirname "$PYTHON")" && pwd)
PYTHON=$BIN_DIR/$(basename "$PYTHON")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/devstack-check.XXXXXX")
function finish {
    local status=$?
    if [[ $status -eq 0 && $KEEP -eq 0 ]]; then
        rm -rf "$WORK"
    else
        echo "devstack-check: work directory kept: $WORK" >&2
    fi
}
trap finish EXIT

function fail {
    local step=$1
    shift
    echo "devstack-check: FAIL ($step): $*" >&2
    exit 1
}

function plugin_scripts {
    local path
    for path in "$REPO/devstack/settings" "$REPO/devstack/plugin.sh" \
            "$REPO"/devstack/lib/*; do
        if [[ -f "$path" ]]; then
            printf '%s\n' "$path"
        fi
    done
}

function step_lint {
    local scripts
    mapfile -t scripts < <(plugin_scripts)
    scripts+=("$HERE/run.sh" "$HERE/dry-run.sh" "$HERE/fake-devstack.sh")
    local script
    for script in "${scripts[@]}"; do
        bash -n "$script" || fail lint "bash -n $script"
    done
    if command -v shellcheck >/dev/null 2>&1; then
        (cd "$REPO" && shellcheck -x "${scripts[@]}") ||
            fail lint "shellcheck (see above)"
    else
        echo "devstack-check: WARNING: shellcheck not installed" \
            "(apt-get install shellcheck): skipped" >&2
    fi
    local bashate=$BIN_DIR/bashate
    if [[ ! -x "$bashate" ]]; then
        bashate=$(command -v bashate || true)
    fi
    [[ -n "$bashate" ]] || fail lint "bashate is not installed"
    "$bashate" -i E006 "${scripts[@]}" || fail lint "bashate (see above)"
    echo "lint: ok (${#scripts[@]} scripts)"
}

function step_static {
    "$PYTHON" "$HERE/static_check.py" "$REPO/devstack" ||
        fail static "see the lines above"
}

function step_scenario {
    local scenario=$1
    FD_PYTHON=$PYTHON bash "$HERE/dry-run.sh" "$REPO" "$scenario" \
        "$WORK/$scenario" || fail "$scenario" "the dry run stopped" \
        "(output: $WORK/$scenario/output.log)"
    "$PYTHON" "$HERE/verify.py" "$WORK/$scenario" ||
        fail "$scenario" "verify.py (calls: $WORK/$scenario/calls.log)"
}

for step in "${steps[@]}"; do
    case "$step" in
        lint) step_lint ;;
        static) step_static ;;
        *) step_scenario "$step" ;;
    esac
done
echo "devstack-check: ok (${steps[*]})"
