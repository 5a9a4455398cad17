#!/usr/bin/env bash
# The whole test suite against a real Kafka broker and real RocksDB:
# starts the single-node KRaft broker (scripts/kafka.sh), runs every test, stops
# the broker it started. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

started_here=0
if [[ -z ${WAYMARK_TEST_BROKERS:-} ]]; then
  eval "$(scripts/kafka.sh start)"
  started_here=1
fi
cleanup() {
  if ((started_here)); then scripts/kafka.sh stop || true; fi
}
trap cleanup EXIT

echo "test.sh: broker at $WAYMARK_TEST_BROKERS" >&2
cargo test --locked "$@"
