#!/usr/bin/env bash
# The project's test command: a RabbitMQ broker for the integration tests, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
# tests/api/consumers.rs runs the Python example consumer.
python3 -c 'import pika' 2>/dev/null || python3 -m pip install --quiet -r examples/consumers/python/requirements.txt
cargo test --locked "$@"
