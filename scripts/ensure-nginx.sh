#!/usr/bin/env bash
# Prints the path of an nginx binary from Debian's package, fetched into a cache when missing
# (KALLINA_NGINX_CACHE, default ~/.cache/kallina-relay-validate/nginx). The package is unpacked,
# not installed: installing would run its maintainer scripts, which start a daemon on port 80.
# Used by scripts/validate-deploy.sh (nginx -t) and by the tests (replicas behind the shipped
# config).
set -euo pipefail
cache=${KALLINA_NGINX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kallina-relay-validate/nginx}
bin=$cache/usr/sbin/nginx
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -x "$bin" ]; then
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "nginx is missing and there is no apt-get to fetch Debian's nginx package" >&2
    exit 1
  fi
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  # A fresh machine may have no package lists yet.
  if ! (cd "$dir" && apt-get -qq -o APT::Sandbox::User=root download nginx >/dev/null 2>&1); then
    as_root apt-get update -qq
    (cd "$dir" && apt-get -qq -o APT::Sandbox::User=root download nginx >/dev/null)
  fi
  mkdir -p "$cache"
  dpkg-deb --fsys-tarfile "$dir"/nginx_*.deb | tar -x -C "$cache" ./usr/sbin/nginx
fi
# The libraries nginx links against are on most Debian machines already; if not, they are
# plain libraries whose installation starts nothing.
if ldd "$bin" | grep -q 'not found'; then
  as_root apt-get install -y -qq --no-install-recommends libcrypt1 libpcre2-8-0 libssl3 zlib1g >&2
fi
echo "$bin"
