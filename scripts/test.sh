#!/usr/bin/env bash
# The whole test suite against a real Kafka broker and real RocksDB:
# starts the single-node KRaft broker (scripts/kafka.sh), runs every fuzz target
# for a bounded time (scripts/fuzz.sh), runs every test, and stops the broker it
# started. Extra arguments go to `cargo test`.
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

# Fuzz first (bounded: WAYMARK_FUZZ_SECONDS per target, 0 skips), so that the
# test runner's summary stays the last thing printed.
if [[ ${WAYMARK_FUZZ_SECONDS:-15} != 0 ]]; then
  scripts/fuzz.sh
fi

echo "test.sh: broker at $WAYMARK_TEST_BROKERS" >&2
cargo test --locked "$@"
