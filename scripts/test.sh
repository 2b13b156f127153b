#!/usr/bin/env bash
# Sets up a fresh machine (Docker, base image, virtualenv) and runs the whole test suite.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup-machine.sh"
cd "$here"
exec "$here/.venv/bin/python" -m pytest "$@"
