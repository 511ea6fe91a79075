#!/usr/bin/env bash
# The benchmark command: release build, RabbitMQ and wrk ready, then the harness (one table,
# each figure beside a baseline measured in the same run) and the criterion micro-benchmarks.
# Pass --harness-only or --micro-only to run one half.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
if ! command -v wrk >/dev/null 2>&1; then
  echo "bench: installing wrk with apt-get"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq wrk >/dev/null; fi
fi
case "${1:-}" in
  --micro-only) ;;
  *) cargo bench --locked --bench harness ;;
esac
case "${1:-}" in
  --harness-only) ;;
  *) cargo bench --locked --bench micro -- --noplot ;;
esac
