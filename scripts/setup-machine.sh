#!/usr/bin/env bash
# Prepares a fresh machine for deploy-agent: Docker engine, the local busybox
# base image (no registry is reachable), sshd and git, and a virtualenv with the
# project installed. Idempotent: every step checks before it acts.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DEPLOY_AGENT_VENV:-$here/.venv}"
base_image="${DEPLOY_AGENT_BASE_IMAGE:-local/busybox}"

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_packages() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -x httpd >/dev/null || missing+=(busybox-static)
  command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  command -v git >/dev/null 2>&1 || missing+=(git)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # promtool checks /metrics in the tests; only it is wanted from the package, not its recommends.
  if ! command -v promtool >/dev/null 2>&1; then
    log "installing prometheus (for promtool)"
    [ "${#missing[@]}" -gt 0 ] || as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
}

start_docker() {
  if docker info >/dev/null 2>&1; then return; fi
  log "starting dockerd"
  if command -v systemctl >/dev/null 2>&1 && systemctl is-system-running >/dev/null 2>&1; then
    as_root systemctl start docker || true
  fi
  if ! docker info >/dev/null 2>&1; then
    as_root sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
  fi
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return
    sleep 1
  done
  log "dockerd did not start; see /var/log/dockerd.log"
  tail -20 /var/log/dockerd.log >&2 || true
  exit 1
}

build_base_image() {
  if docker image inspect "$base_image" >/dev/null 2>&1; then return; fi
  log "building $base_image from Debian's busybox-static"
  local root
  root="$(mktemp -d)"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,tmp,etc,workspace,var/www,root}
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  # One link per applet so that `sh`, `httpd`, `sleep`... resolve on PATH.
  for applet in $(/bin/busybox --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
  echo 'root:x:0:' >"$root/etc/group"
  tar -C "$root" -c . | docker import \
    -c 'ENV PATH=/bin:/sbin:/usr/bin:/usr/sbin' -c 'WORKDIR /workspace' -c 'CMD ["sh"]' \
    - "$base_image" >/dev/null
  rm -rf "$root"
}

install_python() {
  if [ ! -x "$venv/bin/python" ]; then
    log "creating virtualenv $venv"
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c 'import agent, pytest, pytest_asyncio, pytest_timeout, xdist' >/dev/null 2>&1 \
     || [ "$here/pyproject.toml" -nt "$venv/.installed" ]; then
    log "installing deploy-agent and its test dependencies"
    "$venv/bin/pip" install -q --upgrade pip >/dev/null
    "$venv/bin/pip" install -q -e "$here[test]"
    touch "$venv/.installed"
  fi
}

# A swarm on this engine, for swarm applications and their tests, with a second engine in a
# network namespace joined as a worker (scripts/swarm-worker.sh): replicas land on two nodes.
init_swarm() {
  as_root bash "$here/scripts/swarm-worker.sh" start
}

# A registry on loopback (Debian's docker-registry) that swarm nodes pull release images from.
# Docker trusts 127.0.0.0/8 registries over plain HTTP; its data lives in /var/lib/deploy-agent-registry.
registry_addr="${DEPLOY_AGENT_REGISTRY:-127.0.0.1:5000}"
start_registry() {
  if curl -fsS "http://$registry_addr/v2/" >/dev/null 2>&1; then return; fi
  log "starting a registry on $registry_addr"
  local config=/etc/deploy-agent-registry.yml
  printf '%s\n' "version: 0.1" "log:" "  level: warn" "storage:" "  filesystem:" \
    "    rootdirectory: /var/lib/deploy-agent-registry" "  delete:" "    enabled: true" "http:" \
    "  addr: $registry_addr" | as_root tee "$config" >/dev/null
  as_root sh -c "nohup docker-registry serve $config >/var/log/deploy-agent-registry.log 2>&1 &"
  for _ in $(seq 1 50); do
    curl -fsS "http://$registry_addr/v2/" >/dev/null 2>&1 && return
    sleep 0.1
  done
  log "the registry did not start; see /var/log/deploy-agent-registry.log"
  exit 1
}

install_packages
start_docker
init_swarm
start_registry
build_base_image
install_python
log "ready: docker $(docker version --format '{{.Server.Version}}') (swarm of $(docker node ls -q | wc -l) nodes), registry $registry_addr, image $base_image, venv $venv"
