#!/usr/bin/env bash
# A second Docker engine on this machine, in a network namespace of its own, joined to this
# engine's swarm as a worker: swarm applications then run replicas on two nodes, and the worker
# pulls release images from the registry as any other node would. For the tests and for trying
# multi-node out on one machine; a real cluster joins real machines instead (README, Swarm).
#
#   host  da-h 10.231.0.1/24 <-veth-> da-w 10.231.0.2/24  netns da-worker (dockerd, hostname deploy-agent-worker)
#
# The registry stays on the host's loopback (127.0.0.1:5000): inside the namespace, connections
# to 127.0.0.1:5000 are sent to the host over the veth (DNAT), and the host hands those to its
# loopback, so that every node pulls the same image reference. The swarm manager advertises
# 10.231.0.1, the address the worker reaches it at. Idempotent: each step checks before it acts.
#
# Usage: scripts/swarm-worker.sh [start|stop]   (start is what scripts/setup-machine.sh runs)
set -euo pipefail

netns=da-worker
host_if=da-h
worker_if=da-w
host_ip=10.231.0.1
worker_ip=10.231.0.2
worker_host=deploy-agent-worker
socket=/run/deploy-agent-worker.sock
exec_root=/run/deploy-agent-worker
data_root=/var/lib/deploy-agent-worker
registry_port="${DEPLOY_AGENT_REGISTRY_PORT:-5000}"

log() { printf '[swarm-worker] %s\n' "$*" >&2; }
in_ns() { nsenter --net="/run/netns/$netns" "$@"; }
worker() { docker -H "unix://$socket" "$@"; }
# An iptables rule added once: -C finds it when it is there already.
rule() { local table=$1; shift; iptables -t "$table" -C "$@" 2>/dev/null || iptables -t "$table" -A "$@"; }
ns_rule() { local table=$1; shift; in_ns iptables -t "$table" -C "$@" 2>/dev/null || in_ns iptables -t "$table" -A "$@"; }

network() {
  [ -e "/run/netns/$netns" ] || ip netns add "$netns"
  if ! ip link show "$host_if" >/dev/null 2>&1; then
    ip link add "$host_if" type veth peer name "$worker_if"
    ip link set "$worker_if" netns "$netns"
  fi
  ip addr show dev "$host_if" | grep "$host_ip/" >/dev/null || ip addr add "$host_ip/24" dev "$host_if"
  ip link set "$host_if" up
  in_ns ip addr show dev "$worker_if" | grep "$worker_ip/" >/dev/null || in_ns ip addr add "$worker_ip/24" dev "$worker_if"
  in_ns ip link set "$worker_if" up
  in_ns ip link set lo up
  # The registry, seen from the namespace at 127.0.0.1:$registry_port, is the host's.
  sysctl -qw "net.ipv4.conf.$host_if.route_localnet=1"
  rule nat PREROUTING -i "$host_if" -p tcp -d "$host_ip" --dport "$registry_port" \
    -j DNAT --to-destination "127.0.0.1:$registry_port"
  in_ns sysctl -qw net.ipv4.conf.all.route_localnet=1
  ns_rule nat OUTPUT -p tcp -d 127.0.0.1 --dport "$registry_port" -j DNAT --to-destination "$host_ip:$registry_port"
  ns_rule nat POSTROUTING -o "$worker_if" -j MASQUERADE
}

start_engine() {
  if worker info >/dev/null 2>&1; then return; fi
  log "starting the worker's dockerd (netns $netns, $socket)"
  mkdir -p "$exec_root" "$data_root"
  # A pid file left by a worker that died (a reboot, a kill) would stop the new one.
  local pidfile="$exec_root/dockerd.pid"
  if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then rm -f "$pidfile"; fi
  # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup mounts dockerd needs.
  # Its own UTS namespace gives the node a name of its own.
  in_ns unshare --uts sh -c "hostname $worker_host; exec dockerd --data-root $data_root --exec-root $exec_root \
    --pidfile $exec_root/dockerd.pid -H unix://$socket" >>/var/log/deploy-agent-worker.log 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    worker info >/dev/null 2>&1 && return
    sleep 1
  done
  log "the worker's dockerd did not start; see /var/log/deploy-agent-worker.log"
  tail -20 /var/log/deploy-agent-worker.log | tr -d '\000' >&2 || true
  exit 1
}

manager() {
  local state address
  state="$(docker info --format '{{.Swarm.LocalNodeState}}')"
  address="$(docker info --format '{{.Swarm.NodeAddr}}')"
  if [ "$state" = active ] && [ "$address" = "$host_ip" ]; then return; fi
  if [ "$state" = active ] && [ "$address" != 127.0.0.1 ]; then
    log "this engine is in a swarm of its own at $address: not touching it, no worker"
    exit 0
  fi
  if [ "$state" = active ]; then
    # The loopback swarm an earlier setup made cannot be reached by a worker: made again.
    log "re-initialising the swarm to advertise $host_ip (it advertised 127.0.0.1)"
    docker swarm leave --force >/dev/null
  fi
  docker swarm init --advertise-addr "$host_ip" >/dev/null
}

join() {
  local cluster
  cluster="$(docker info --format '{{.Swarm.Cluster.ID}}')"
  if [ "$(worker info --format '{{.Swarm.LocalNodeState}}')" = active ]; then
    # Still in the swarm? A re-initialised manager leaves it in a cluster that is gone.
    if docker node ls --format '{{.Hostname}} {{.Status}}' | grep -x "$worker_host Ready" >/dev/null; then return; fi
    worker swarm leave --force >/dev/null || true
  fi
  # Nodes the worker left behind (a restarted machine) go before it joins again.
  docker node ls --format '{{.ID}} {{.Hostname}} {{.Status}}' | awk -v h="$worker_host" '$2 == h && $3 != "Ready" {print $1}' \
    | xargs -r docker node rm --force >/dev/null
  log "joining the worker to swarm $cluster"
  worker swarm join --token "$(docker swarm join-token -q worker)" --advertise-addr "$worker_ip" "$host_ip:2377" >/dev/null
  for _ in $(seq 1 30); do
    docker node ls --format '{{.Hostname}} {{.Status}}' | grep -x "$worker_host Ready" >/dev/null && return
    sleep 1
  done
  log "the worker joined but is not Ready"
  exit 1
}

stop() {
  if worker info >/dev/null 2>&1; then
    worker swarm leave --force >/dev/null 2>&1 || true
    local pid
    pid="$(cat "$exec_root/dockerd.pid" 2>/dev/null || true)"
    if [ -n "$pid" ]; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
  fi
  docker node ls --format '{{.ID}} {{.Hostname}}' 2>/dev/null | awk -v h="$worker_host" '$2 == h {print $1}' \
    | xargs -r docker node rm --force >/dev/null 2>&1 || true
  ip link del "$host_if" 2>/dev/null || true
  ip netns del "$netns" 2>/dev/null || true
}

case "${1:-start}" in
  start) network; start_engine; manager; join; log "ready: worker $worker_host ($worker_ip) in the swarm" ;;
  stop) stop ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
