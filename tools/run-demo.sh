#!/usr/bin/env bash
# The README's "run" command: set up this machine, then show the whole
# flow of one agent (rapid-vmm-demo) on libvirt's test hypervisor and the
# local RabbitMQ. Arguments go to rapid-vmm-demo (see --help).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/tools/setup-env.sh"
VENV=${RAPID_VMM_VENV:-$REPO/.venv}
cd "$REPO"
exec "$VENV/bin/rapid-vmm-demo" "$@"
