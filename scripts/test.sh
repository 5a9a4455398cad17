#!/usr/bin/env bash
# The whole test suite against a real Kafka broker and real RocksDB:
# starts the single-node KRaft broker (scripts/kafka.sh), runs every fuzz target
# for a bounded time (scripts/fuzz.sh), runs every test, and stops the broker it
# started. Extra arguments go to `cargo test`. Before the tests, a small run of
# the end-to-end and webhook-receiver load harnesses (WAYMARK_E2E_SMOKE=0 skips
# them) and of the chaos soak (WAYMARK_CHAOS_SMOKE=0 skips it). The harnesses
# are built with one feature set (`ingest`, a superset of `e2e`), so that one
# build serves all three.
set -euo pipefail
cd "$(dirname "$0")/.."

started_here=0
fresh_data=
if [[ -z ${WAYMARK_TEST_BROKERS:-} ]]; then
  # A broker of its own in a fresh data directory: the tests need none of an
  # earlier run's topics, and a directory that kept thousands of them makes the
  # broker's start slow (past kafka.sh's 90 s).
  if [[ -z ${WAYMARK_KAFKA_DATA:-} ]]; then
    fresh_data=$(mktemp -d "${TMPDIR:-/tmp}/waymark-test-kafka.XXXXXX")
    export WAYMARK_KAFKA_DATA=$fresh_data
  fi
  # `eval "$(...)"` would hide a failed start (an empty export line): check it.
  exports=$(scripts/kafka.sh start) || {
    echo "test.sh: the Kafka broker did not start (see the messages above); fix that, or point WAYMARK_TEST_BROKERS at a running broker" >&2
    scripts/kafka.sh stop >/dev/null 2>&1 || true
    exit 1
  }
  eval "$exports"
  started_here=1
fi
cleanup() {
  if ((started_here)); then scripts/kafka.sh stop || true; fi
  if [[ -n $fresh_data ]]; then rm -rf "$fresh_data"; fi
}
trap cleanup EXIT

# Fuzz first (bounded: WAYMARK_FUZZ_SECONDS per target, 0 skips), so that the
# test runner's summary stays the last thing printed.
if [[ ${WAYMARK_FUZZ_SECONDS:-15} != 0 ]]; then
  scripts/fuzz.sh
fi

echo "test.sh: broker at $WAYMARK_TEST_BROKERS" >&2

# A small run of the end-to-end load harness (benches/), so it cannot rot: the
# debug worker against the real broker, both delivery modes. Figures from it mean
# nothing (debug build, tiny stream); the README's come from release builds.
if [[ ${WAYMARK_E2E_SMOKE:-1} != 0 ]]; then
  cargo build --locked --bin waymark
  target=${CARGO_TARGET_DIR:-target}
  cargo run --locked --quiet --manifest-path benches/Cargo.toml --features ingest --bin e2e-load -- \
    --quick --brokers "$WAYMARK_TEST_BROKERS" --waymark "$target/debug/waymark"
  # The webhook receiver's load harness, the same way.
  cargo run --locked --quiet --manifest-path benches/Cargo.toml --features ingest --bin ingest-load -- \
    --quick --brokers "$WAYMARK_TEST_BROKERS" --waymark "$target/debug/waymark"
fi

# The chaos soak's short configuration (docs/chaos-soak.md): two instances in
# one group under a SIGKILL, a freeze past the session timeout, a broker kill
# and restart, a rolling restart and added input partitions, both delivery
# modes. It kills and restarts the broker, so only one this script started
# (WAYMARK_CHAOS_SMOKE=0 skips it).
if [[ ${WAYMARK_CHAOS_SMOKE:-1} != 0 ]] && ((started_here)); then
  cargo build --locked --bin waymark
  target=${CARGO_TARGET_DIR:-target}
  cargo run --locked --quiet --manifest-path benches/Cargo.toml --features ingest --bin chaos-soak -- \
    --quick --brokers "$WAYMARK_TEST_BROKERS" --waymark "$target/debug/waymark"
fi

cargo test --locked "$@"
