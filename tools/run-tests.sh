#!/usr/bin/env bash
# The README's "test" command, and what CI runs (.ci/run): set up this
# machine, then run lint, the sample-config check, the unit, functional,
# devstack-plugin, system and Nova tests, and the documentation build
# (warnings as errors) through tox. Extra
# arguments replace the list of tox environments, e.g.
# `tools/run-tests.sh -e unit`.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/tools/setup-env.sh"
# The functional tests use libvirtd's test driver (test+unix:///default)
# and the system tests real guests: libvirtd must run (root only; the
# script installs and starts it when it is not there).
if [ "$(id -u)" -eq 0 ]; then
    bash "$REPO/tools/system/setup-host.sh"
fi
VENV=${RAPID_VMM_VENV:-$REPO/.venv}
cd "$REPO"
if [ "$#" -eq 0 ]; then
    set -- -e pep8,genconfig-check,unit,functional,devstack,system,nova,docs
fi
exec "$VENV/bin/tox" "$@"
