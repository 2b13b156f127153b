#!/usr/bin/env bash
# Sets up a fresh machine, starts deploy-agent in the background, and runs a real
# deployment through it: a build in a Docker container whose log is followed live.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/setup-machine.sh"
cd "$here"

state="$here/.deploy-agent"
sources="$here/.deploy-agent-sources"
mkdir -p "$state" "$sources"
chmod 700 "$state"
# Path sources must come from a directory the config allows (security.source_roots); the
# config lives in the state dir, which is never a source itself.
config="$state/config.toml"
if [ ! -f "$config" ]; then
  cat >"$config" <<EOF_CONFIG
[agent]
state_dir = "."
listen = "127.0.0.1:8420"

[security]
source_roots = ["$sources"]
EOF_CONFIG
fi
export DEPLOY_AGENT_URL="${DEPLOY_AGENT_URL:-http://127.0.0.1:8420}"
cli="$here/.venv/bin/deploy-agent"

if ! curl -fsS "$DEPLOY_AGENT_URL/healthz" >/dev/null 2>&1; then
  echo "[quickstart] starting deploy-agent (state in $state, log in $state/agent.log)"
  nohup "$cli" run --config "$config" >"$state/agent.log" 2>&1 &
  echo $! >"$state/agent.pid"
  for _ in $(seq 1 100); do
    curl -fsS "$DEPLOY_AGENT_URL/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
fi
curl -fsS "$DEPLOY_AGENT_URL/healthz" && echo
export DEPLOY_AGENT_TOKEN="$(cat "$state/token")"

# A tiny application source: the build turns it into a page in /workspace.
src="$sources/quickstart"
mkdir -p "$src"
echo "hello from deploy-agent" >"$src/message.txt"

echo "[quickstart] submitting a deployment and following its log"
"$cli" submit --app quickstart --image local/busybox --source-path "$src" \
  --command 'echo "building in $(pwd)"; for i in 1 2 3; do echo "step $i"; sleep 0.5; done; cat message.txt > index.html; ls -l' \
  --follow
"$cli" ls --limit 5
echo "[quickstart] the agent keeps running (pid $(cat "$state/agent.pid" 2>/dev/null || echo '?')); stop it with: kill \$(cat $state/agent.pid)"
