#!/usr/bin/env bash
# The benchmark command: release build, RabbitMQ and wrk ready, then the harness (one table,
# each figure beside a baseline measured in the same run) and the criterion micro-benchmarks.
# Pass --harness-only or --micro-only to run one half.
#
# The harness reads (cargo passes the environment through):
#   KALLINA_BENCH_RELAY_BIN=<path>  measure that relay binary instead of this build's, e.g. one
#       saved from an earlier commit, to compare the two on the same machine in one session:
#         git worktree add /tmp/before <commit> && cargo build --release \
#           --manifest-path /tmp/before/Cargo.toml && cp /tmp/before/target/release/kallina-relay /tmp/
#         KALLINA_BENCH_RELAY_BIN=/tmp/kallina-relay scripts/bench.sh --harness-only
#   KALLINA_BENCH_ONLY=ingest,large,memory  only those scenarios (comma-separated)
#   KALLINA_BENCH_SECONDS=<n>  cap each load run at n seconds: checks the harness, not figures
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
if ! command -v wrk >/dev/null 2>&1; then
  echo "bench: installing wrk with apt-get"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq wrk >/dev/null; fi
fi
# The Node receiver the harness measures beside the relay (express + amqplib, from the npm
# registry at the versions package-lock.json pins).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "bench: Node.js and npm are needed for the Node receiver baseline (apt-get install nodejs npm)" >&2
  exit 1
fi
npm ci --prefix benches/node-receiver --no-audit --no-fund >/dev/null
case "${1:-}" in
  --micro-only) ;;
  *) cargo bench --locked --bench harness ;;
esac
case "${1:-}" in
  --harness-only) ;;
  *) cargo bench --locked --bench micro -- --noplot ;;
esac
