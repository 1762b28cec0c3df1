#!/usr/bin/env bash
# demo.sh - kr-tunneld's main job with no cluster: boots Debian's kernel in a VM (or uses the host
# kernel when it has ipip/fou), builds three nodes as network namespaces around a fake Kubernetes
# API server, runs the real kr-tunneld on each, shows the tunnels, routes and rules it made, pings
# pod to pod over IPv4 and IPv6, and switches the cluster live from IPIP to GUE under a 10 ms ping.
# Installs what it needs with apt-get (root). Takes about a minute on a warm machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec bash tests/run-kernel-tests.sh --exact e2e::demo::three_nodes_pods_ping_across_tunnels --nocapture
