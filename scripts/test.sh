#!/usr/bin/env bash
# The project's test command: a RabbitMQ broker for the integration tests, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
# tests/api/durability.rs runs the relay under strace (it fails, saying so, without it).
if ! command -v strace >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null
    else
        echo "strace is missing: install it (as root: apt-get install strace)" >&2
        exit 1
    fi
fi
# tests/api/replicas.rs runs relays behind the shipped nginx config (nginx from Debian's package).
KALLINA_TEST_NGINX=$(scripts/ensure-nginx.sh)
export KALLINA_TEST_NGINX
# tests/api/inspector.rs drives Debian's headless Chromium through chromedriver.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test: installing chromium and chromium-driver with apt-get"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "chromium is missing: install it (as root: apt-get install chromium chromium-driver)" >&2
        exit 1
    fi
fi
# tests/api/consumers.rs runs the Python example consumer.
python3 -c 'import pika' 2>/dev/null || python3 -m pip install --quiet -r examples/consumers/python/requirements.txt
cargo test --locked "$@"
# The cluster test starts three RabbitMQ nodes of its own: it runs alone, once the rest is done.
if [ "$#" -eq 0 ]; then
    cargo test --locked --test api -- --ignored cluster::
fi
