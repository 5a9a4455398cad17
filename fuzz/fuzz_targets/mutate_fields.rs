//! A real fixture body (chosen by the input) with its fields edited by the input:
//! strings swapped for offset-, time- and multi-byte-like strings, numbers and
//! strings flipped, fields removed, huge strings, entries repeated. The edited
//! body keeps the carrier's shape, so the fuzzer reaches the field parsers that
//! random bytes rarely get past the JSON and shape checks to. Never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    waymark_fuzz_support::mutate_fields(data);
});
