#!/usr/bin/env bash
# The project's test command: a RabbitMQ broker for the integration tests, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
cargo test --locked "$@"
