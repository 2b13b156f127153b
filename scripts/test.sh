#!/usr/bin/env bash
# Sets up a fresh machine (Docker, base image, virtualenv) and runs the whole test suite.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup-machine.sh"
cd "$here"
python="$here/.venv/bin/python"

# pytest's exit code, with "no test collected" (5) as success: a selection may hold no test of a phase.
run() {
  local code=0
  "$python" -m pytest "$@" || code=$?
  if [ "$code" -ne 0 ] && [ "$code" -ne 5 ]; then
    exit "$code"
  fi
}

# Most tests wait on Docker, sshd or a daemon rather than the CPU: run them three at a time, one module per worker (a module's tests share application names).
run -n "${DEPLOY_AGENT_TEST_WORKERS:-3}" --dist loadfile -m "not alone" "$@"
# Tests that measure the agent's latency run after, one at a time: beside three workers on two cores they would measure the neighbours.
run -p no:xdist -m alone "$@"
