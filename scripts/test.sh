#!/usr/bin/env bash
# Sets up a fresh machine (Docker, base image, virtualenv) and runs the whole test suite.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup-machine.sh"
cd "$here"
# Most tests wait on Docker, sshd or a daemon rather than the CPU: run them three at a time, one module per worker (a module's tests share application names).
exec "$here/.venv/bin/python" -m pytest -n "${DEPLOY_AGENT_TEST_WORKERS:-3}" --dist loadfile "$@"
