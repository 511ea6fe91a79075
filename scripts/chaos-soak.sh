#!/usr/bin/env bash
# The chaos soak: distinct events stream into the real binary for SECONDS (default 60) while it
# is killed with SIGKILL and its RabbitMQ restarted at random moments; then it checks that every
# event answered 2xx arrived, and prints the counts.
#
# It starts a RabbitMQ node of its own (own name, ports and data under a temporary directory)
# and stops it at the end, so a broker on 127.0.0.1:5672 is neither needed nor disturbed; only
# the rabbitmq-server package must be installed.
#
# --cluster runs it on a RabbitMQ cluster of three such nodes (one Erlang cookie, join_cluster)
# with quorum queues and every node's URL given to the relay; a broker restart then takes down
# one node, never one a quorum still needs.
#
#   scripts/chaos-soak.sh [--cluster] [SECONDS]
#   KALLINA_RELAY_CHAOS_RATE=250 KALLINA_RELAY_CHAOS_SENDERS=4 scripts/chaos-soak.sh 600
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --cluster ]; then
  export KALLINA_RELAY_CHAOS_CLUSTER=3
  shift
fi
secs="${1:-${KALLINA_RELAY_CHAOS_SECS:-60}}"
case "$secs" in
  '' | *[!0-9]*) echo "usage: $0 [--cluster] [SECONDS]" >&2; exit 2 ;;
esac

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
export PATH="$PATH:/usr/sbin"
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "chaos-soak: installing rabbitmq-server with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi

KALLINA_RELAY_CHAOS_SECS="$secs" exec cargo test --locked --test api chaos_soak -- \
  --ignored --nocapture
