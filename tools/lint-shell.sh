#!/usr/bin/env bash
# Lint every shell script of the project: bash -n, shellcheck, bashate.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
mapfile -t scripts < <(git ls-files -co --exclude-standard \
    '*.sh' '.ci/run' 'devstack/plugin.sh' 'devstack/settings' \
    'devstack/lib/*' | sort -u)
if [ "${#scripts[@]}" -eq 0 ]; then
    echo "no shell scripts"
    exit 0
fi
status=0
for script in "${scripts[@]}"; do
    bash -n "$script" || status=1
done
if command -v shellcheck >/dev/null 2>&1; then
    shellcheck -x "${scripts[@]}" || status=1
else
    echo "shellcheck not installed (apt-get install shellcheck); skipped" >&2
fi
bashate -i E006 "${scripts[@]}" || status=1
exit "$status"
