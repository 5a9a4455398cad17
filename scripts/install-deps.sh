#!/usr/bin/env bash
# Install the Debian packages Waymark needs to build and test, when missing (the
# one place that knows them: the README's first command and .ci/run both call it).
#   build: libclang-dev (RocksDB's bindgen), pkg-config, libssl-dev and zlib1g-dev
#          (librdkafka with TLS), make and g++;
#   tests: Java 17 and Maven (the Kafka broker), python3-yaml and promtool
#          (deploy/ checks; promtool is taken out of Debian's `prometheus`
#          package without installing the server).
# Uses sudo when not root. Does nothing when everything is there.
set -euo pipefail

need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
dpkg -s pkg-config >/dev/null 2>&1 || need+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
dpkg -s zlib1g-dev >/dev/null 2>&1 || need+=(zlib1g-dev)
command -v make >/dev/null 2>&1 || need+=(make)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
dpkg -s python3-yaml >/dev/null 2>&1 || need+=(python3-yaml)

want_promtool=0
command -v promtool >/dev/null 2>&1 || want_promtool=1

if ((${#need[@]} == 0 && want_promtool == 0)); then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps.sh: no apt-get here; install the equivalents of: ${need[*]}" >&2
  exit 1
fi
sudo=()
if ((EUID != 0)); then
  command -v sudo >/dev/null 2>&1 || { echo "install-deps.sh: run as root (or install sudo) to install: ${need[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
if ((${#need[@]})); then
  echo "install-deps.sh: installing ${need[*]}" >&2
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ((want_promtool)); then
  echo "install-deps.sh: installing promtool (from Debian's prometheus package, without the server)" >&2
  tmp=$(mktemp -d)
  chmod 0777 "$tmp" # apt-get download runs as the _apt user
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null)
  dpkg -x "$tmp"/prometheus_*.deb "$tmp/root"
  "${sudo[@]}" install -m 0755 "$tmp/root/usr/bin/promtool" /usr/local/bin/promtool
fi
