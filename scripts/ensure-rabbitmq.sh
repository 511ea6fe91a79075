#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672, as the integration tests need:
# installs Debian's rabbitmq-server if it is missing, starts it detached, waits for it.
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if port_open; then
  echo "rabbitmq: already answering on 127.0.0.1:5672"
  exit 0
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
  echo "rabbitmq: installing rabbitmq-server with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
export PATH="$PATH:/usr/sbin"

# The package's own start-up may already have started it.
if ! port_open; then
  echo "rabbitmq: starting (rabbitmq-server -detached)"
  # A node that is already starting makes this fail; the wait below decides.
  as_root rabbitmq-server -detached || echo "rabbitmq: rabbitmq-server -detached failed; waiting anyway"
fi

for _ in $(seq 1 90); do
  if port_open && timeout 20 rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    echo "rabbitmq: ready"
    exit 0
  fi
  sleep 2
done
echo "rabbitmq: did not become ready within 3 minutes; see /var/log/rabbitmq/" >&2
exit 1
