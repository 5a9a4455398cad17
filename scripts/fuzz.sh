#!/usr/bin/env bash
# Build every fuzz target (one per carrier parser, plus the archive-line envelope
# through the whole core) and run each for a bounded time, seeded with the
# carrier's fixtures. A crash fails the script and leaves the input in
# fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh                 all targets, WAYMARK_FUZZ_SECONDS each (default 15)
#   scripts/fuzz.sh ups 600         one target for 10 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

seconds=${2:-${WAYMARK_FUZZ_SECONDS:-15}}
targets=(easypost ups fedex usps dhl shippo aftership envelope)
[[ $# -ge 1 ]] && targets=("$1")

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz.sh: cargo fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 1
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz (once)" >&2
  cargo install cargo-fuzz --locked --quiet
fi

# Fuzz builds are instrumented: keep them in their own cache, outside the clone.
export CARGO_TARGET_DIR=${WAYMARK_FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-/var/cache/waymark-target}/fuzz}

echo "fuzz.sh: building ${#targets[@]} targets" >&2
cargo +nightly fuzz build --fuzz-dir fuzz
for target in "${targets[@]}"; do
  corpus=$(mktemp -d)
  if [[ $target == envelope ]]; then
    # Archive lines: one seed per line of the scenario archives.
    cat replay/*.ndjson | split -l 1 - "$corpus/line-"
  elif [[ -d fixtures/$target ]]; then
    find "fixtures/$target" -maxdepth 1 -type f -name '*.json' -exec cp {} "$corpus"/ \;
  fi
  echo "fuzz.sh: $target for ${seconds}s ($(ls "$corpus" | wc -l) seeds)" >&2
  cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$corpus" -- \
    -max_total_time="$seconds" -max_len=65536 -print_final_stats=0 2>&1 | tail -n 3 >&2
  rm -rf "$corpus"
done
echo "fuzz.sh: no crash in ${#targets[@]} targets" >&2
