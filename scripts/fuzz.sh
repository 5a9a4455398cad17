#!/usr/bin/env bash
# Build every fuzz target (one per carrier parser, the archive-line envelope
# through the whole core, corrections, the webhook signature schemes, and
# mutate_fields, which edits the fields of fixture bodies) and run each for a
# bounded time, seeded with the carrier's fixtures and
# with the shared dictionary fuzz/dict/carriers.dict. A crash fails the script
# and leaves the input in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh                 all targets, WAYMARK_FUZZ_SECONDS each (default 15)
#   scripts/fuzz.sh ups 600         one target for 10 minutes
#
# WAYMARK_FUZZ_RUNS=10000000 runs a campaign of that many executions instead and
# merges what it found into fuzz/corpus/<target>/. WAYMARK_FUZZ_SANITIZER=none
# builds without AddressSanitizer: Waymark has no unsafe code, so what a
# target can find is a panic, and without ASan's allocator mutate_fields runs
# about ten times faster (long campaigns); the default stays `address`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

seconds=${2:-${WAYMARK_FUZZ_SECONDS:-15}}
runs=${WAYMARK_FUZZ_RUNS:-}
sanitizer=${WAYMARK_FUZZ_SANITIZER:-address}
targets=(easypost ups fedex usps dhl shippo aftership envelope correction signatures mutate_fields)
# Multi-byte characters, offsets, escapes, edge numbers and field names: tokens
# random mutation takes long to build byte by byte (an absolute path, whatever
# directory cargo fuzz runs the target from).
dict="$PWD/fuzz/dict/carriers.dict"
[[ $# -ge 1 ]] && targets=("$1")

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz.sh: cargo fuzz needs a nightly toolchain; installing it (once)" >&2
  rustup toolchain install nightly --profile minimal >&2 || {
    echo "fuzz.sh: could not install the nightly toolchain: run 'rustup toolchain install nightly', or skip fuzzing with WAYMARK_FUZZ_SECONDS=0" >&2
    exit 1
  }
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz (once)" >&2
  cargo install cargo-fuzz --locked --quiet
fi

# Fuzz builds are instrumented: keep them in their own cache, outside the clone.
export CARGO_TARGET_DIR=${WAYMARK_FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-/var/cache/waymark-target}/fuzz}

echo "fuzz.sh: building ${#targets[@]} targets" >&2
cargo +nightly fuzz build --fuzz-dir fuzz --sanitizer "$sanitizer"
for target in "${targets[@]}"; do
  seeds=$(mktemp -d)
  found=$(mktemp -d)
  if [[ $target == envelope ]]; then
    # Archive lines: one seed per line of the scenario archives.
    cat replay/*.ndjson | split -l 1 - "$seeds/line-"
  elif [[ $target == correction ]]; then
    # The corrections of the scenario that carries them: each one's body.
    python3 - "$seeds" <<'PY'
import json, sys, pathlib
for i, line in enumerate(open("replay/scenarios/false-delivery-retracted.ndjson", encoding="utf-8")):
    record = json.loads(line)
    if record["topic"] == "tracking.control":
        (pathlib.Path(sys.argv[1]) / f"correction-{i}").write_text(record["payload"], encoding="utf-8")
PY
  elif [[ $target == signatures ]]; then
    # Each provider's header value on the first line, a fixture body after it.
    body=$(cat fixtures/easypost/client_library_event_body.json)
    i=0
    for head in "hmac-sha256-hex=38f3f53c103713df81616a0a186d77141957323ec21d5fe9363db93840f527db" \
      "t=1765000000,v1=a7f8cb2b276f0d6f62bcad97fb43025cbf0cf897a7b9841e6b4581333c89b90b" \
      "2yoIC2aSZQG+D7ss4ZyOsvathb1DP3MRMsyl2TKfOm0=" "Sat, 06 Dec 2025 05:46:40 -0000" "2025-12-06T05:46:40Z" \
      "Basic d2F5bWFyazpjb3JyZWN0IGhvcnNl" "sha256=00ff" "fuzz"; do
      printf '%s\n%s' "$head" "$body" > "$seeds/seed-$i"
      i=$((i + 1))
    done
  elif [[ $target == mutate_fields ]]; then
    # The fixture bodies are built into the target; a seed of two bytes (little
    # endian) picks one and edits nothing yet: one seed per fixture.
    n=$(find fixtures -mindepth 2 -maxdepth 2 -name '*.json' | wc -l)
    for ((i = 0; i < n; i++)); do
      printf "\\x$(printf %02x $((i % 256)))\\x$(printf %02x $((i / 256)))" > "$seeds/fixture-$i"
    done
  elif [[ -d fixtures/$target ]]; then
    find "fixtures/$target" -maxdepth 1 -type f -name '*.json' -exec cp {} "$seeds"/ \;
  fi
  kept=$PWD/fuzz/corpus/$target
  mkdir -p "$kept"
  # libFuzzer writes new inputs to the first directory and only reads the others.
  if [[ -n $runs ]]; then
    limit=(-runs="$runs")
    echo "fuzz.sh: $target for $runs executions ($(ls "$seeds" | wc -l) seeds, $(ls "$kept" | wc -l) in the corpus)" >&2
  else
    limit=(-max_total_time="$seconds")
    echo "fuzz.sh: $target for ${seconds}s ($(ls "$seeds" | wc -l) seeds, $(ls "$kept" | wc -l) in the corpus)" >&2
  fi
  started=$SECONDS
  log=$(mktemp)
  if ! cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer "$sanitizer" "$target" "$found" "$kept" "$seeds" -- \
    -dict="$dict" "${limit[@]}" -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz.sh: $target crashed; the input is in fuzz/artifacts/$target/ (reproduce: cargo +nightly fuzz run --fuzz-dir fuzz $target <file>)" >&2
    exit 1
  fi
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  echo "fuzz.sh: $target: ${executions:-?} executions in $((SECONDS - started))s, no crash" >&2
  if [[ -n $runs ]]; then
    before=$(ls "$kept" | wc -l)
    cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer "$sanitizer" "$target" "$kept" "$found" -- -merge=1 >/dev/null 2>&1
    echo "$(date -u +%FT%TZ) $target executions=${executions:-?} seconds=$((SECONDS - started)) corpus=$before->$(ls "$kept" | wc -l) crashes=0" >> fuzz/campaign.log
  fi
  rm -rf "$seeds" "$found" "$log"
done
echo "fuzz.sh: no crash in ${#targets[@]} targets" >&2
