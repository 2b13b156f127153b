"""A swarm application's update through the agent against the same update with the docker CLI.

Usage: .venv/bin/python bench/swarm_rollout.py [--replicas 2] [--rounds 3]

Needs the swarm and registry of scripts/setup-machine.sh. Two release images (a and b) go to
the registry first. Then, interleaved round by round, the agent updates its service to the
other image (submit to `succeeded`: every replica on the new image and healthy), and `docker
service update --image ... --detach=false` updates a second service with the same settings
(start-first, rollback, 5 s monitor, the same health check), which returns once Swarm reports
the update converged. Both wait for the same thing; the ratio is the agent's cost on top of
Swarm's own rollout.
"""

from __future__ import annotations

import argparse
import subprocess
import time

from common import IMAGE, Agent, median, report

REGISTRY = "127.0.0.1:5000"
SERVE = "echo ok > /tmp/index.html; exec httpd -f -p 8080 -h /tmp"
CHECK = "wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1"
BARE_SERVICE = "bench-bare-rollout"


def push_images() -> list[str]:
    """Two release images that differ (a label), in the registry."""
    images = []
    for tag in ("a", "b"):
        container = subprocess.run(["docker", "create", IMAGE], capture_output=True, text=True, check=True).stdout.strip()
        image = f"{REGISTRY}/bench/rollout:{tag}"
        subprocess.run(["docker", "commit", "--change", f"LABEL bench.tag={tag}", container, image],
                       stdout=subprocess.DEVNULL, check=True)
        subprocess.run(["docker", "rm", container], stdout=subprocess.DEVNULL, check=True)
        subprocess.run(["docker", "push", "-q", image], stdout=subprocess.DEVNULL, check=True)
        images.append(image)
    return images


def request(image: str, replicas: int) -> dict[str, object]:
    return {
        "application": "bench-rollout",
        "run": {"runtime": "swarm", "image": image, "replicas": replicas, "port": 8080,
                "command": ["sh", "-c", SERVE]},
        "health_check": {"type": "http", "path": "/", "interval_s": 1, "retries": 10},
    }


def through_agent(agent: Agent, image: str, replicas: int) -> float:
    began = time.monotonic()
    final = agent.wait_final(agent.submit(request(image, replicas))["id"])
    assert final["status"] == "succeeded", final
    return time.monotonic() - began


def bare_create(image: str, replicas: int) -> None:
    subprocess.run(
        ["docker", "service", "create", "-q", "--detach=false", "--name", BARE_SERVICE, "--replicas", str(replicas),
         "--publish", "8080", "--health-cmd", CHECK, "--health-interval", "1s", "--health-retries", "10",
         "--update-order", "start-first", "--update-failure-action", "rollback", "--update-monitor", "5s",
         "--update-parallelism", "1", "--update-delay", "0s", image, "sh", "-c", SERVE],
        stdout=subprocess.DEVNULL, check=True,
    )


def bare_update(image: str) -> float:
    began = time.monotonic()
    subprocess.run(["docker", "service", "update", "-q", "--detach=false", "--image", image, BARE_SERVICE],
                   stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    images = push_images()
    agent = Agent()
    with open(agent.config, "a") as config:
        config.write(f'\n[registry]\nurl = "{REGISTRY}"\n')
    agent.start()
    ours, theirs = [], []
    try:
        through_agent(agent, images[0], args.replicas)
        bare_create(images[0], args.replicas)
        for round_number in range(args.rounds):
            image = images[(round_number + 1) % 2]
            ours.append(through_agent(agent, image, args.replicas))
            theirs.append(bare_update(image))
    finally:
        agent.stop()
        subprocess.run(["docker", "service", "rm", BARE_SERVICE, "deploy-agent-bench-rollout"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"swarm update of {args.replicas} replicas, agent vs `docker service update --detach=false`, interleaved")
    report("update to a new image, until every replica is healthy (median)", f"{median(ours):.2f} s",
           f"{median(theirs):.2f} s", median(ours) / median(theirs))


if __name__ == "__main__":
    main()
