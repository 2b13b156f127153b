#!/usr/bin/env bash
# Installs deploy-agent from this checkout as a systemd service (Debian 12 and alike).
#
#   sudo scripts/install.sh [--now]
#
# A virtualenv in /opt/deploy-agent (Debian's Python refuses system-wide pip, PEP 668), the
# package installed into it from the checkout, /etc/deploy-agent/config.toml from
# config.example.toml when there is none yet (mode 0600; an existing one is never touched),
# the state directory, and the unit in /etc/systemd/system, reloaded and enabled.
# --now also (re)starts the service. Running it again upgrades the package in place.
# Overridable: DEPLOY_AGENT_PREFIX, DEPLOY_AGENT_ETC, DEPLOY_AGENT_STATE, DEPLOY_AGENT_UNIT_DIR, PYTHON.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${DEPLOY_AGENT_PREFIX:-/opt/deploy-agent}"
etc_dir="${DEPLOY_AGENT_ETC:-/etc/deploy-agent}"
state_dir="${DEPLOY_AGENT_STATE:-/var/lib/deploy-agent}"
unit_dir="${DEPLOY_AGENT_UNIT_DIR:-/etc/systemd/system}"
python="${PYTHON:-python3}"
start_now=no

for arg in "$@"; do
  case "$arg" in
    --now) start_now=yes ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (known: --now)" >&2; exit 2 ;;
  esac
done

log() { printf '[install] %s\n' "$*" >&2; }

if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  log "installing python3-venv"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi

if [ ! -x "$prefix/bin/python" ]; then
  log "creating the virtualenv $prefix"
  "$python" -m venv "$prefix"
fi
log "installing deploy-agent from $here into $prefix"
"$prefix/bin/python" -m pip install --quiet --upgrade "$here"

install -d -m 0700 "$etc_dir" "$state_dir"
config="$etc_dir/config.toml"
if [ ! -e "$config" ]; then
  log "writing $config from config.example.toml (edit it, then: systemctl reload deploy-agent)"
  install -m 0600 "$here/config.example.toml" "$config"
else
  chmod 0600 "$config"
fi
if ! "$prefix/bin/deploy-agent" check-config "$config"; then
  log "$config is not valid: fix it before starting the service"
  start_now=no
fi

install -d -m 0755 "$unit_dir"
unit="$unit_dir/deploy-agent.service"
sed "s|^ExecStart=/opt/deploy-agent/bin/deploy-agent |ExecStart=$prefix/bin/deploy-agent |; s|--config /etc/deploy-agent/config.toml|--config $config|" \
  "$here/systemd/deploy-agent.service" > "$unit.tmp"
chmod 0644 "$unit.tmp"
mv "$unit.tmp" "$unit"
log "installed $unit"

if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable deploy-agent.service
  if [ "$start_now" = yes ]; then
    systemctl restart deploy-agent.service
    log "started: systemctl status deploy-agent; journalctl -u deploy-agent -p err"
  fi
else
  log "systemd is not running here: the unit is installed but not enabled"
fi
